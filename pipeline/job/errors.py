"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A bad job spec, URI, bucket, credential or model: the message says what is wrong and how to fix it."""


class JobStopped(Exception):
    """The job stopped itself on purpose (error-rate threshold); rows already written stay committed."""


class JobFailed(Exception):
    """The job could not finish (e.g. output storage kept failing after retries); staged rows stay for a rerun."""
