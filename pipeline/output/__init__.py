"""A run's life on its output, behind one front door (`run_output.open_output`, then `RunOutput`'s steps, named
as Ray Data's `Datasink` names them: `on_write_start`, `sink`, `on_write_complete`). It takes the output's config
and a small `RunPolicy`, never the whole job. The protocol, and why: docs/commit-protocol.md."""

from pipeline.output.identity import RunIdentity
from pipeline.output.run_output import RunOutput, RunPolicy, make_format, open_output

__all__ = ["RunIdentity", "RunOutput", "RunPolicy", "make_format", "open_output"]
