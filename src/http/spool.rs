//! Media streamed into unnamed temporary files as it arrives (a URL's answer, an uploaded
//! body): what a transfer holds in memory is one [`BATCH`], whatever the media's size.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use sha2::Digest;

use botvisor_actors::MediaFile;

/// Bytes gathered before each write to the file.
pub const BATCH: usize = 256 * 1024;

/// Why a body could not be spooled.
#[derive(Debug)]
pub enum SpoolError {
    /// More than the limit.
    TooBig,
    /// The body broke off (its error).
    Read(String),
    /// The temporary file could not be made or written.
    Disk(std::io::Error),
}

impl SpoolError {
    /// The API's answer: past `max`, the 413 of any media too large; a broken body as
    /// `read` says (the caller knows whose body it was); no room on disk, 507.
    pub fn answer(
        self,
        max: usize,
        read: impl FnOnce(String) -> crate::http::errors::ApiError,
    ) -> crate::http::errors::ApiError {
        match self {
            SpoolError::TooBig => crate::http::handlers::media::too_big(max),
            SpoolError::Read(e) => read(e),
            SpoolError::Disk(e) => crate::http::errors::ApiError::new(
                hyper::StatusCode::INSUFFICIENT_STORAGE,
                format!("no room for the media on its way: {e}"),
            ),
        }
    }
}

/// Streams `body` into an unnamed temporary file, at most `max` bytes, hashing it on
/// the way: an empty body is a file of length 0 (the caller decides what that means).
pub async fn spool<B>(mut body: B, max: usize) -> Result<MediaFile, SpoolError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let file = tokio::task::spawn_blocking(tempfile::tempfile)
        .await
        .map_err(|e| SpoolError::Disk(std::io::Error::other(e)))?
        .map_err(SpoolError::Disk)?;
    let file = Arc::new(file);
    let mut hasher = sha2::Sha256::new();
    let mut len = 0u64;
    let mut written = 0u64;
    let mut pending = BytesMut::new();
    loop {
        let frame = body.frame().await;
        let done = frame.is_none();
        if let Some(frame) = frame {
            let frame = frame.map_err(|e| SpoolError::Read(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                len += data.len() as u64;
                if len > max as u64 {
                    return Err(SpoolError::TooBig);
                }
                hasher.update(&data);
                pending.extend_from_slice(&data);
            }
        }
        if pending.len() >= BATCH || (done && !pending.is_empty()) {
            let chunk = pending.split().freeze();
            let at = written;
            written += chunk.len() as u64;
            let file = Arc::clone(&file);
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                file.write_all_at(&chunk, at)
            })
            .await
            .map_err(|e| SpoolError::Disk(std::io::Error::other(e)))?
            .map_err(SpoolError::Disk)?;
        }
        if done {
            break;
        }
    }
    Ok(MediaFile {
        file,
        len,
        sha256: hasher.finalize().into(),
    })
}

/// The first bytes of a spooled media (enough to tell its type).
pub fn head(media: &MediaFile) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut head = vec![0u8; 16.min(media.len as usize)];
    match media.file.read_at(&mut head, 0) {
        Ok(n) => head.truncate(n),
        Err(_) => head.clear(),
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn a_body_is_spooled_whole_hashed_and_bounded() {
        let data: Vec<u8> = (0..(BATCH * 2 + 17)).map(|i| (i % 251) as u8).collect();
        let m = spool(Full::new(Bytes::from(data.clone())), data.len())
            .await
            .unwrap();
        assert_eq!(m.len, data.len() as u64);
        assert_eq!(m.sha256, <[u8; 32]>::from(sha2::Sha256::digest(&data)));
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut m.reader_from(0), &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(head(&m), data[..16]);
        assert!(matches!(
            spool(Full::new(Bytes::from(data.clone())), data.len() - 1).await,
            Err(SpoolError::TooBig)
        ));
        let empty = spool(Full::new(Bytes::new()), 10).await.unwrap();
        assert_eq!((empty.len, head(&empty).len()), (0, 0));
    }
}
