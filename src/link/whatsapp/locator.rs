//! Where a received media's bytes are on WhatsApp's media servers, and the keys to read
//! them: what a media message carries besides its description, kept with the message
//! (`ReceivedMedia::locator`, JSON) so `GET …/messages/:messageId/media` can fetch and
//! decrypt the bytes later, through the session's client.

use serde::{Deserialize, Serialize};
use whatsapp_rust::wacore::download::{Downloadable, MediaType};

/// One media's locator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Locator {
    /// `image`, `video`, `audio`, `document`, `sticker`: which keys the media key derives.
    kind: String,
    direct_path: String,
    #[serde(with = "b64")]
    media_key: Vec<u8>,
    #[serde(with = "b64")]
    file_enc_sha256: Vec<u8>,
    #[serde(with = "b64")]
    file_sha256: Vec<u8>,
    file_length: Option<u64>,
}

impl Locator {
    /// The locator of a media message's fields (`None` when one it needs is missing: such
    /// a media cannot be fetched, only described).
    pub(super) fn of(
        kind: &str,
        direct_path: &Option<String>,
        media_key: &Option<Vec<u8>>,
        file_enc_sha256: &Option<Vec<u8>>,
        file_sha256: &Option<Vec<u8>>,
        file_length: Option<u64>,
    ) -> Option<String> {
        let locator = Locator {
            kind: kind.to_string(),
            direct_path: direct_path.clone().filter(|p| !p.is_empty())?,
            media_key: media_key.clone().filter(|k| !k.is_empty())?,
            file_enc_sha256: file_enc_sha256.clone().unwrap_or_default(),
            file_sha256: file_sha256.clone().unwrap_or_default(),
            file_length,
        };
        serde_json::to_string(&locator).ok()
    }

    /// A stored locator read back.
    pub(super) fn parse(s: &str) -> Result<Locator, String> {
        serde_json::from_str(s)
            .map_err(|e| format!("not a media locator of the WhatsApp link: {e}"))
    }
}

fn nonempty(b: &[u8]) -> Option<&[u8]> {
    (!b.is_empty()).then_some(b)
}

impl Downloadable for Locator {
    fn direct_path(&self) -> Option<&str> {
        Some(&self.direct_path)
    }
    fn media_key(&self) -> Option<&[u8]> {
        Some(&self.media_key)
    }
    fn file_enc_sha256(&self) -> Option<&[u8]> {
        nonempty(&self.file_enc_sha256)
    }
    fn file_sha256(&self) -> Option<&[u8]> {
        nonempty(&self.file_sha256)
    }
    fn file_length(&self) -> Option<u64> {
        self.file_length
    }
    fn app_info(&self) -> MediaType {
        match self.kind.as_str() {
            "image" => MediaType::Image,
            "video" => MediaType::Video,
            "audio" => MediaType::Audio,
            "sticker" => MediaType::Sticker,
            _ => MediaType::Document,
        }
    }
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locator_reads_back_as_written_and_needs_a_path_and_a_key() {
        let s = Locator::of(
            "image",
            &Some("/v/t62/abc".into()),
            &Some(vec![1; 32]),
            &Some(vec![2; 32]),
            &Some(vec![3; 32]),
            Some(1234),
        )
        .unwrap();
        let l = Locator::parse(&s).unwrap();
        assert_eq!(l.direct_path(), Some("/v/t62/abc"));
        assert_eq!(l.media_key(), Some(&[1u8; 32][..]));
        assert_eq!(l.app_info(), MediaType::Image);
        assert_eq!(l.file_length(), Some(1234));
        assert!(Locator::of("image", &None, &Some(vec![1; 32]), &None, &None, None).is_none());
        assert!(Locator::of("image", &Some("/p".into()), &None, &None, &None, None).is_none());
        assert!(Locator::parse("sim:SIMIN0001").is_err());
    }
}
