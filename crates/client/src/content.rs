//! Message bodies as apps see them. Every user message body is a `Content` (PROTOCOL.md §8.5):
//! a text, or a media reference. Its human rendering becomes [`StoredMessage::text`]; a body
//! this SDK cannot read renders as [`UNSUPPORTED`] and is never an error.
//!
//! [`StoredMessage::text`]: crate::StoredMessage::text

use tern_proto::content::{Content, MediaRef, body::Body};

/// The text of a body that is not readable `Content` (another client, a newer version).
pub const UNSUPPORTED: &str = "[unsupported message]";

/// Longest file name kept by [`sanitize_file_name`], in bytes.
const MAX_FILE_NAME: usize = 255;

/// The human text of a message body.
pub(crate) fn render(body: &[u8]) -> String {
    match Content::decode_body(body).map(|c| c.body) {
        Ok(Some(Body::Text(t))) => t,
        Ok(Some(Body::Media(m))) => describe(&m),
        Ok(None) | Err(_) => UNSUPPORTED.to_owned(),
    }
}

/// The media reference of a body, if it is one.
pub(crate) fn media(body: &[u8]) -> Option<MediaRef> {
    match Content::decode_body(body).ok()?.body? {
        Body::Media(m) => Some(m),
        Body::Text(_) => None,
    }
}

/// `[photo.jpg, 1.2 MB image/jpeg]`, then the caption if there is one.
pub fn describe(m: &MediaRef) -> String {
    let name = sanitize_file_name(&m.file_name).unwrap_or_else(|| "file".to_owned());
    let mime = if m.mime_type.is_empty() {
        "application/octet-stream"
    } else {
        m.mime_type.as_str()
    };
    let mut s = format!("[{name}, {} {mime}]", human_size(m.size));
    let caption = m.caption.trim();
    if !caption.is_empty() {
        s.push(' ');
        s.push_str(caption);
    }
    s
}

/// Decimal units, one decimal place: `512 B`, `1.2 KB`, `3.0 MB`, `2.1 GB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A file name from a message, made safe to create in a directory of the receiver's choice:
/// only the last path component (`/` and `\` both separate), without control characters,
/// trimmed, at most 255 bytes. `None` if nothing usable is left (empty, `.`, `..`).
pub fn sanitize_file_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let mut cleaned = cleaned.trim().to_owned();
    if cleaned.len() > MAX_FILE_NAME {
        let mut cut = MAX_FILE_NAME;
        while !cleaned.is_char_boundary(cut) {
            cut -= 1;
        }
        cleaned.truncate(cut);
    }
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        return None;
    }
    Some(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_render_as_text() {
        assert_eq!(render(&Content::text("hi").encode_body()), "hi");
        let photo = MediaRef {
            file_name: "photo.jpg".into(),
            mime_type: "image/jpeg".into(),
            size: 1_234_567,
            ..Default::default()
        };
        let body = Content::media(photo.clone()).encode_body();
        assert_eq!(render(&body), "[photo.jpg, 1.2 MB image/jpeg]");
        assert_eq!(media(&body), Some(photo.clone()));
        let captioned = MediaRef {
            caption: "  at the beach ".into(),
            ..photo
        };
        assert_eq!(
            render(&Content::media(captioned).encode_body()),
            "[photo.jpg, 1.2 MB image/jpeg] at the beach"
        );
        assert_eq!(media(&Content::text("x").encode_body()), None);
    }

    #[test]
    fn unreadable_bodies_are_unsupported_not_errors() {
        for body in [
            &b"plain text from an old client"[..],
            &[0xff, 0xff, 0xff],
            &[],
            // version 2
            &[0x08, 0x02, 0x12, 0x01, b'a'],
        ] {
            assert_eq!(render(body), UNSUPPORTED, "{body:?}");
            assert_eq!(media(body), None);
        }
        // A media reference with a hostile name still renders safely.
        let m = MediaRef {
            file_name: "../../etc/passwd\n".into(),
            ..Default::default()
        };
        assert_eq!(describe(&m), "[passwd, 0 B application/octet-stream]");
    }

    #[test]
    fn sizes_are_human() {
        let cases = [
            (0, "0 B"),
            (999, "999 B"),
            (1000, "1.0 KB"),
            (1_234_567, "1.2 MB"),
            (999_999, "1.0 MB"),
            (2_100_000_000, "2.1 GB"),
            (u64::MAX, "18446744.1 TB"),
        ];
        for (n, want) in cases {
            assert_eq!(human_size(n), want, "{n}");
        }
    }

    #[test]
    fn file_names_lose_their_directories() {
        let cases = [
            ("photo.jpg", Some("photo.jpg")),
            ("/etc/passwd", Some("passwd")),
            ("..\\..\\boot.ini", Some("boot.ini")),
            ("a/b/../c.txt", Some("c.txt")),
            ("..", None),
            ("a/..", None),
            (".", None),
            ("...", None),
            ("", None),
            ("dir/", None),
            ("  spaced name.png  ", Some("spaced name.png")),
            ("bell\u{7}.txt", Some("bell.txt")),
            (".hidden", Some(".hidden")),
        ];
        for (name, want) in cases {
            assert_eq!(sanitize_file_name(name).as_deref(), want, "{name:?}");
        }
        let long = "é".repeat(200);
        let cut = sanitize_file_name(&long).expect("name");
        assert!(cut.len() <= 255 && cut.chars().all(|c| c == 'é'));
    }
}
