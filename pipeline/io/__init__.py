"""Objects in stores (S3 or any S3-compatible endpoint, local disk), without Ray: clients, bytes in and out, listing
a folder or a manifest, and the read stage."""
