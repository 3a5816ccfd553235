"""The review loop on an output's tables: what people should look at goes out, their answers come back (`truth`),
and sibling tables beside the output hold what the loop keeps. No Ray, no torch."""
