//! OCI images built in code: tar layers with every kind of entry Pronto must
//! handle (whiteouts, opaque directories, links, devices, xattrs, long
//! names, large and many small files), compressed, described by a config
//! and a manifest, and written into an OCI image layout that `skopeo` pushes.

mod content;
mod digest;
mod fixtures;
mod layer;
mod layout;

pub use content::Content;
pub use digest::Digested;
pub use fixtures::{edge_image, model_image, model_server_image};
pub use layer::{Compression, Entry, EntryKind, Layer, LongNames};
pub use layout::{BuiltImage, BuiltLayer, ImageBuilder, OciLayout, Platform};
