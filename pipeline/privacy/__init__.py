"""What a job may reveal, in one place, ahead of every other folder (it imports none of them at run time):
`identifying` (which DICOM attributes identify a patient; the keys every row carries), `safe_errors` (error text
a pseudonymised job may write, from known-safe parts only), `redact` (DICOM values and the input's path out of a
message), `pseudonyms` (HMAC tokens for URIs and UIDs, the token map)."""
