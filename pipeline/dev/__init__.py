"""For people and tests, not jobs: the demo, a local S3 server, crash points for the kill tests, the import graph."""
