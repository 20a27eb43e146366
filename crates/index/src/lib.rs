//! The seekable index over an unmodified OCI layer: the file table, gzip
//! checkpoints and span digests that let a node read any file of a layer by
//! fetching only the compressed spans that hold it.
//!
//! This is pure format code. It must not know about the network or FUSE:
//! it reads and writes bytes it is given.
