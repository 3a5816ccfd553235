"""What a job is: its validated spec, its errors, the checks made before anything starts, its output rows."""
