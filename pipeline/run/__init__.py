"""The story of a run, free of the engine: check, open the output, plan the stages, stream rows, commit,
summarise (job.py, read it first). An executor (pipeline/ray/) only runs the planned stages and hands rows back."""
