//! Generates the server side of containerd's snapshots gRPC service, and
//! both sides of Pronto's status service (messages in `src/status.rs`). The
//! message types come from `containerd-client` (generated from containerd's
//! own protos); only the service trait and router are made here, so the
//! build needs no `.proto` files.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    const TYPES: &str = "containerd_client::services::v1::snapshots";
    let rpc = |name: &str, route: &str, input: &str, output: &str, streaming: bool| {
        let method = Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("{TYPES}::{input}"))
            .output_type(if output == "Empty" {
                // google.protobuf.Empty is `()` in prost.
                "crate::generated::Empty".to_owned()
            } else {
                format!("{TYPES}::{output}")
            })
            .codec_path("tonic_prost::ProstCodec");
        if streaming {
            method.server_streaming().build()
        } else {
            method.build()
        }
    };
    let service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1")
        .method(rpc(
            "prepare",
            "Prepare",
            "PrepareSnapshotRequest",
            "PrepareSnapshotResponse",
            false,
        ))
        .method(rpc(
            "view",
            "View",
            "ViewSnapshotRequest",
            "ViewSnapshotResponse",
            false,
        ))
        .method(rpc(
            "mounts",
            "Mounts",
            "MountsRequest",
            "MountsResponse",
            false,
        ))
        .method(rpc(
            "commit",
            "Commit",
            "CommitSnapshotRequest",
            "Empty",
            false,
        ))
        .method(rpc(
            "remove",
            "Remove",
            "RemoveSnapshotRequest",
            "Empty",
            false,
        ))
        .method(rpc(
            "stat",
            "Stat",
            "StatSnapshotRequest",
            "StatSnapshotResponse",
            false,
        ))
        .method(rpc(
            "update",
            "Update",
            "UpdateSnapshotRequest",
            "UpdateSnapshotResponse",
            false,
        ))
        .method(rpc(
            "list",
            "List",
            "ListSnapshotsRequest",
            "ListSnapshotsResponse",
            true,
        ))
        .method(rpc(
            "usage",
            "Usage",
            "UsageRequest",
            "UsageResponse",
            false,
        ))
        .method(rpc("cleanup", "Cleanup", "CleanupRequest", "Empty", false))
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[service]);

    // Pronto's own status service, on the same socket.
    let status = Service::builder()
        .name("Status")
        .package("pronto.v1")
        .method(
            Method::builder()
                .name("images")
                .route_name("Images")
                .input_type("crate::status::StatusRequest")
                .output_type("crate::status::StatusResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .method(
            Method::builder()
                .name("warm")
                .route_name("Warm")
                .input_type("crate::status::WarmRequest")
                .output_type("crate::status::WarmResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .method(
            Method::builder()
                .name("expect")
                .route_name("Expect")
                .input_type("crate::status::ExpectRequest")
                .output_type("crate::status::ExpectResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    Builder::new()
        .build_client(true)
        .build_server(true)
        .compile(&[status]);
}
