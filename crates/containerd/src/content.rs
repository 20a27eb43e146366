//! Blobs in containerd's content store: written (and verified by
//! containerd against their digest) in chunks, or labelled when present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::{
    Info, InfoRequest, UpdateRequest, WriteAction, WriteContentRequest,
    content_client::ContentClient,
};
use containerd_client::tonic::{Code, Status};
use tokio::sync::mpsc;

use crate::PullError;
use crate::session::{Session, containerd};

/// Bytes per write message.
const CHUNK: usize = 1 << 20;

/// Where a blob's bytes come from.
#[derive(Debug)]
pub(crate) enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// A blob to put into the content store.
#[derive(Debug)]
pub(crate) struct Blob<'a> {
    pub digest: &'a str,
    pub size: u64,
    pub source: Source<'a>,
}

pub(crate) async fn has_content(session: &Session, digest: &str) -> Result<bool, PullError> {
    let info = ContentClient::new(session.channel.clone())
        .info(session.request(InfoRequest {
            digest: digest.to_owned(),
        }))
        .await;
    match info {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(containerd(format!("content info {digest}"))(s)),
    }
}

/// Writes `blob` into containerd's content store with `labels`; content
/// already there only gets the labels.
pub(crate) async fn write_content(
    session: &Session,
    blob: Blob<'_>,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    if has_content(session, blob.digest).await? {
        return label_content(session, &blob, labels).await;
    }
    let reference = format!("pronto-{}-{}", crate::unique(), blob.digest);
    let message = |action: WriteAction, offset: u64, data: Vec<u8>, labels| WriteContentRequest {
        action: action as i32,
        r#ref: reference.clone(),
        total: blob.size as i64,
        expected: blob.digest.to_owned(),
        offset: offset as i64,
        data,
        labels,
    };
    let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
    let (chunks, file) = match blob.source {
        Source::Bytes(bytes) => {
            let chunks = bytes
                .chunks(CHUNK)
                .enumerate()
                .map(|(i, c)| {
                    message(
                        WriteAction::Write,
                        (i * CHUNK) as u64,
                        c.to_vec(),
                        HashMap::new(),
                    )
                })
                .collect();
            (chunks, None)
        }
        Source::File(path) => (Vec::new(), Some(path.to_owned())),
    };
    let commit = message(WriteAction::Commit, blob.size, Vec::new(), labels);
    let feeder = tokio::spawn(feed(tx, chunks, file, commit));
    let result = send(session, rx).await;
    feeder.abort();
    match result {
        Ok(()) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(containerd(format!("write content {}", blob.digest))(s)),
    }
}

/// Sets `labels` on content that is already there.
async fn label_content(
    session: &Session,
    blob: &Blob<'_>,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    if labels.is_empty() {
        return Ok(());
    }
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    let info = Info {
        digest: blob.digest.to_owned(),
        size: blob.size as i64,
        created_at: None,
        updated_at: None,
        labels,
    };
    ContentClient::new(session.channel.clone())
        .update(session.request(UpdateRequest {
            info: Some(info),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(containerd(format!("label content {}", blob.digest)))?;
    Ok(())
}

/// Sends the write messages: `chunks`, then the file's bytes, then
/// `commit`. Stops quietly when the stream is gone.
async fn feed(
    tx: mpsc::Sender<WriteContentRequest>,
    chunks: Vec<WriteContentRequest>,
    file: Option<PathBuf>,
    commit: WriteContentRequest,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    for chunk in chunks {
        if tx.send(chunk).await.is_err() {
            return Ok(());
        }
    }
    if let Some(path) = file {
        let mut f = tokio::fs::File::open(&path).await?;
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let write = WriteContentRequest {
                action: WriteAction::Write as i32,
                offset: offset as i64,
                data: buf,
                labels: HashMap::new(),
                ..commit.clone()
            };
            offset += n as u64;
            if tx.send(write).await.is_err() {
                return Ok(());
            }
        }
    }
    let _ = tx.send(commit).await;
    Ok(())
}

/// Streams the write messages to containerd until it confirms the commit.
async fn send(session: &Session, rx: mpsc::Receiver<WriteContentRequest>) -> Result<(), Status> {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut responses = ContentClient::new(session.channel.clone())
        .write(session.request(stream))
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        if response.action == WriteAction::Commit as i32 {
            break;
        }
    }
    Ok(())
}
