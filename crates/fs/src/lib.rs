//! The read-only lazy filesystem: the merged tree of an image's layers, the
//! read path that turns "these bytes of this file" into verified spans, and
//! the FUSE adapter.
//!
//! It must not know about containerd. Layers reach it through one narrow
//! interface, [`LayerSource`]: the entries (the tree) and "read these bytes
//! of this entry"; the snapshotter holds them as [`LazyLayer`]s. One read
//! path, [`IndexedLayer`], serves every lazy format; what differs between
//! formats is only their [`layout::Layout`]: the seekable index over
//! unmodified layers, or a chunked layer's table of contents (eStargz).

mod fuse;
mod image;
mod indexed;
mod kernel;
pub mod layout;
pub mod mounts;
pub mod profile;
mod readahead;
mod schedule;
mod source;
mod tree;

pub use fuse::{FuseMount, MountOptions, PASSTHROUGH_SEEN, ReadObserver};
pub use image::{
    ChunkedToc, LayerMode, NodeContext, OpenError, OpenedImage, chunked_layer, fetch_toc,
    lazy_layer, open_image, open_lazy_layer, open_whole_layer,
};
pub use indexed::{
    BlobReader, DEFAULT_READ_AHEAD, IndexOrigin, IndexedLayer, LayerFetchStats, LocalBlob,
    RegistryBlob,
};
pub use kernel::{Channel, Negotiated, refuse_one, request_resend};
pub use schedule::{DEFAULT_READ_AHEAD_REQUESTS, Scheduler};
pub use source::{LayerSource, LazyLayer, PrefetchResult, ReadError, ReadResult};
pub use tree::{Node, NodeKind, ROOT, Tree, TreeMode};
