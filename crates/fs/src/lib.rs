//! The read-only lazy filesystem: the merged tree of an image's layers, the
//! read path that turns "these bytes of this file" into verified spans, the
//! prefetch scheduler, and the FUSE adapter.
//!
//! It must not know about containerd; layers reach it through one narrow
//! interface so that every layer format plugs in without touching FUSE code.
