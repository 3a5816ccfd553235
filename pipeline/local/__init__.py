"""Running a job on this machine without Ray: `executor` (the driver's side), `worker` (the model process)."""
