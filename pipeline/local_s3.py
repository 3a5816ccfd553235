"""`python -m pipeline.local_s3 [PORT]`, the name earlier docs gave the local S3 server (now pipeline/dev/)."""

import sys

from pipeline.dev.local_s3 import LocalS3Server, serve, use_server

__all__ = ["LocalS3Server", "serve", "use_server"]

if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else None)
