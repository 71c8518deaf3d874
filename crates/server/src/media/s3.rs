//! S3-compatible media storage through `object_store` (feature `s3`).
