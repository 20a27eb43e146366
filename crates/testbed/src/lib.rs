//! The real-stack test harness for Pronto.
//!
//! Tests and the demo start the real programs Pronto works with — Debian's
//! `docker-registry`, `containerd` with `runc`, `skopeo` — on loopback in
//! temporary directories, build OCI images in code, and push them. Every
//! process the harness starts is stopped by PID when its handle is dropped
//! (also while a test panics), and everything it mounted below its
//! directories is unmounted. Each handle picks its own free port, directory
//! and containerd namespace, so tests running in parallel never collide.
//!
//! This crate is test support: it may use `anyhow`, and it must never talk to
//! anything but loopback.

pub mod containerd;
pub mod cri;
pub mod debian;
pub mod faults;
pub mod forge;
mod http;
pub mod image;
pub mod kubeapi;
pub mod net;
pub mod node;
pub mod prereq;
pub mod process;
pub mod registry;
pub mod relay;
pub mod token;
pub mod tree;

pub use containerd::{Containerd, ContainerdOptions, CriOptions};
pub use faults::{Fault, FaultProxy};
pub use image::{Compression, Content, Entry, ImageBuilder, Layer, OciLayout};
pub use node::{KeeperGuard, MountedImage, NodeConfig, ProntoNode};
pub use prereq::Prereq;
pub use registry::{Credentials, Notifications, Registry, RegistryOptions};
pub use relay::{Relay, RelayOptions};
pub use token::{TokenServer, TokenServerOptions};
