//! A minimal client of containerd's CRI image service (`runtime.v1`), as
//! kubelet calls it: enough to pull and remove images the way a Kubernetes
//! node does. Messages are declared here with the field numbers of
//! Kubernetes' `api.proto`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tonic::codegen::http::uri::PathAndQuery;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
    #[prost(map = "string, string", tag = "2")]
    pub annotations: HashMap<String, String>,
}

/// Registry credentials, as kubelet sends a pull secret's.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
    #[prost(string, tag = "3")]
    pub auth: String,
    #[prost(string, tag = "4")]
    pub server_address: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageResponse {
    #[prost(string, tag = "1")]
    image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RemoveImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RemoveImageResponse {}

#[derive(Clone, PartialEq, prost::Message)]
struct ListImagesRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct Image {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, repeated, tag = "2")]
    repo_tags: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ListImagesResponse {
    #[prost(message, repeated, tag = "1")]
    images: Vec<Image>,
}

/// CRI over containerd's socket.
#[derive(Debug)]
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
}

impl Cri {
    pub fn connect(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = runtime
            .block_on(containerd_client::connect(socket))
            .with_context(|| format!("connect to {}", socket.display()))?;
        Ok(Self { runtime, channel })
    }

    fn call<Req, Resp>(&self, method: &'static str, request: Req) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        self.runtime.block_on(async {
            grpc.ready().await.context("CRI connection")?;
            let path = PathAndQuery::from_static(method);
            let response: tonic::Response<Resp> = grpc
                .unary(
                    tonic::Request::new(request),
                    path,
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .with_context(|| format!("CRI {method}"))?;
            Ok(response.into_inner())
        })
    }

    /// `PullImage`, as kubelet sends it; returns the image ID.
    pub fn pull_image(&self, image: &str) -> Result<String> {
        self.pull_image_with(image, None)
    }

    /// `PullImage` with a pod's pull secret.
    pub fn pull_image_with(&self, image: &str, auth: Option<AuthConfig>) -> Result<String> {
        let response: PullImageResponse = self.call(
            "/runtime.v1.ImageService/PullImage",
            PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    annotations: HashMap::new(),
                }),
                auth,
            },
        )?;
        Ok(response.image_ref)
    }

    /// `ListImages`: the tags of every image.
    pub fn list_image_refs(&self) -> Result<Vec<String>> {
        let response: ListImagesResponse =
            self.call("/runtime.v1.ImageService/ListImages", ListImagesRequest {})?;
        Ok(response
            .images
            .into_iter()
            .flat_map(|image| image.repo_tags)
            .collect())
    }

    /// `RemoveImage` (by reference or ID).
    pub fn remove_image(&self, image: &str) -> Result<()> {
        let _: RemoveImageResponse = self.call(
            "/runtime.v1.ImageService/RemoveImage",
            RemoveImageRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    annotations: HashMap::new(),
                }),
            },
        )?;
        Ok(())
    }
}
