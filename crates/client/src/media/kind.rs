//! What a file is: its MIME type (from its first bytes, else its extension) and, for JPEG and
//! PNG images, its dimensions and a thumbnail of at most 64x64 (a small JPEG). A file that
//! cannot be decoded simply has no thumbnail.

use std::io::{BufReader, Cursor, Read, Seek};
use std::path::Path;

use image::{ImageFormat, ImageReader, Limits};

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 64;
/// Images larger than this are not decoded for a thumbnail (their dimensions still count).
const MAX_THUMBNAIL_SOURCE: u64 = 64 * 1024 * 1024;
/// Bound on the decoder's memory, and on the image's sides.
const MAX_DECODE_ALLOC: u64 = 128 * 1024 * 1024;
const MAX_SIDE: u32 = 16_384;
/// A thumbnail must stay a few KB: it travels inside the message (16 KiB in all).
const MAX_THUMBNAIL_BYTES: usize = 8 * 1024;

/// Extension → MIME type, for files whose first bytes say nothing.
const BY_EXTENSION: &[(&str, &str)] = &[
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("png", "image/png"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("heic", "image/heic"),
    ("mp4", "video/mp4"),
    ("mov", "video/quicktime"),
    ("webm", "video/webm"),
    ("mp3", "audio/mpeg"),
    ("m4a", "audio/mp4"),
    ("ogg", "audio/ogg"),
    ("opus", "audio/ogg"),
    ("wav", "audio/wav"),
    ("pdf", "application/pdf"),
    ("zip", "application/zip"),
    ("txt", "text/plain"),
    ("md", "text/markdown"),
    ("csv", "text/csv"),
    ("json", "application/json"),
];

const OCTET_STREAM: &str = "application/octet-stream";

/// The MIME type of a file from its first bytes (`head`, 16 are enough) or else its name.
pub fn mime_type(head: &[u8], file_name: &str) -> &'static str {
    let by_magic = match head {
        [0xff, 0xd8, 0xff, ..] => Some("image/jpeg"),
        [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, ..] => Some("image/png"),
        [b'G', b'I', b'F', b'8', ..] => Some("image/gif"),
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => Some("image/webp"),
        [b'%', b'P', b'D', b'F', b'-', ..] => Some("application/pdf"),
        [_, _, _, _, b'f', b't', b'y', b'p', b'q', b't', ..] => Some("video/quicktime"),
        [
            _,
            _,
            _,
            _,
            b'f',
            b't',
            b'y',
            b'p',
            b'h',
            b'e',
            b'i',
            b'c',
            ..,
        ] => Some("image/heic"),
        [_, _, _, _, b'f', b't', b'y', b'p', b'M', b'4', b'A', ..] => Some("audio/mp4"),
        [_, _, _, _, b'f', b't', b'y', b'p', ..] => Some("video/mp4"),
        _ => None,
    };
    if let Some(m) = by_magic {
        return m;
    }
    let ext = Path::new(file_name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    BY_EXTENSION
        .iter()
        .find(|(e, _)| *e == ext)
        .map_or(OCTET_STREAM, |(_, m)| m)
}

/// An image's dimensions and thumbnail (JPEG, at most 64x64).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub thumbnail: Vec<u8>,
}

/// Dimensions and thumbnail of a JPEG or PNG image read from `source` (`size` bytes).
/// `None` if it is neither or cannot be read; `thumbnail` is empty if only the header could.
pub fn image_info<R: Read + Seek>(source: R, mime: &str, size: u64) -> Option<ImageInfo> {
    let format = match mime {
        "image/jpeg" => ImageFormat::Jpeg,
        "image/png" => ImageFormat::Png,
        _ => return None,
    };
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let mut source = BufReader::new(source);
    // Dimensions come from the header alone.
    let mut header = ImageReader::with_format(&mut source, format);
    header.limits(limits.clone());
    let (width, height) = header.into_dimensions().ok()?;
    let mut info = ImageInfo {
        width,
        height,
        thumbnail: Vec::new(),
    };
    if size <= MAX_THUMBNAIL_SOURCE && source.rewind().is_ok() {
        let mut reader = ImageReader::with_format(&mut source, format);
        reader.limits(limits);
        info.thumbnail = reader
            .decode()
            .ok()
            .and_then(|img| thumbnail(&img))
            .unwrap_or_default();
    }
    Some(info)
}

/// A JPEG of at most 64x64 (aspect kept), small enough to travel inside a message.
fn thumbnail(img: &image::DynamicImage) -> Option<Vec<u8>> {
    let small = if img.width() <= THUMBNAIL_SIDE && img.height() <= THUMBNAIL_SIDE {
        img.to_rgb8()
    } else {
        img.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).to_rgb8()
    };
    for quality in [75, 50, 30] {
        let mut out = Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(&small)
            .ok()?;
        let bytes = out.into_inner();
        if bytes.len() <= MAX_THUMBNAIL_BYTES {
            return Some(bytes);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(img: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> image::DynamicImage {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        }))
    }

    #[test]
    fn mime_types_come_from_magic_then_extension() {
        assert_eq!(mime_type(&[0xff, 0xd8, 0xff, 0xe0], "x.bin"), "image/jpeg");
        assert_eq!(
            mime_type(b"\x89PNG\r\n\x1a\n0000", "photo.jpg"),
            "image/png",
            "the bytes win over the name"
        );
        assert_eq!(mime_type(b"%PDF-1.7", "doc"), "application/pdf");
        assert_eq!(mime_type(b"\0\0\0\x18ftypisom", "clip"), "video/mp4");
        assert_eq!(mime_type(b"\0\0\0\x14ftypqt  ", "clip"), "video/quicktime");
        assert_eq!(mime_type(b"RIFF\0\0\0\0WEBPVP8 ", "a"), "image/webp");
        assert_eq!(mime_type(b"hello", "notes.TXT"), "text/plain");
        assert_eq!(mime_type(b"", "Photo.JPEG"), "image/jpeg");
        assert_eq!(mime_type(b"\x01\x02", "data"), "application/octet-stream");
        assert_eq!(
            mime_type(b"\x01\x02", "archive.tar.xz"),
            "application/octet-stream"
        );
    }

    #[test]
    fn images_get_dimensions_and_a_small_jpeg_thumbnail() {
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let bytes = encoded(&gradient(300, 200), format);
            let mime = mime_type(&bytes, "");
            let info = image_info(Cursor::new(&bytes), mime, bytes.len() as u64).expect("an image");
            assert_eq!((info.width, info.height), (300, 200), "{format:?}");
            assert!(!info.thumbnail.is_empty() && info.thumbnail.len() <= MAX_THUMBNAIL_BYTES);
            let thumb = image::load_from_memory_with_format(&info.thumbnail, ImageFormat::Jpeg)
                .expect("thumbnail is a JPEG");
            // Aspect ratio kept, longest side 64.
            assert_eq!(thumb.width(), 64, "{format:?}");
            assert!((42..=43).contains(&thumb.height()), "{format:?}");
        }
        // Small images are not enlarged.
        let bytes = encoded(&gradient(10, 20), ImageFormat::Png);
        let info = image_info(Cursor::new(&bytes), "image/png", 100).expect("image");
        let thumb = image::load_from_memory(&info.thumbnail).expect("decode");
        assert_eq!((thumb.width(), thumb.height()), (10, 20));
    }

    #[test]
    fn undecodable_images_have_no_thumbnail_and_are_not_errors() {
        // Not an image at all.
        assert_eq!(image_info(Cursor::new(b"not a png"), "image/png", 9), None);
        // Not a kind we decode.
        assert_eq!(image_info(Cursor::new(b"GIF89a"), "image/gif", 6), None);
        // A valid header with the pixels cut off: dimensions, no thumbnail.
        let bytes = encoded(&gradient(300, 200), ImageFormat::Png);
        let cut = &bytes[..bytes.len() / 2];
        match image_info(Cursor::new(cut), "image/png", cut.len() as u64) {
            Some(info) => {
                assert_eq!((info.width, info.height), (300, 200));
                assert!(info.thumbnail.is_empty());
            }
            None => panic!("the header is intact"),
        }
        // Past the limit on sides: refused from the header, before any allocation.
        let mut huge = encoded(&gradient(1, 1), ImageFormat::Png);
        // IHDR: length at 8, type at 12, width at 16..20, CRC of type and data at 29..33.
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.to_be_bytes());
        let mut ok = huge.clone();
        ok[16..20].copy_from_slice(&1000u32.to_be_bytes());
        let crc = crc32(&ok[12..29]);
        ok[29..33].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            image_info(Cursor::new(&ok), "image/png", 100).map(|i| i.width),
            Some(1000),
            "the patched header is valid"
        );
        assert_eq!(image_info(Cursor::new(&huge), "image/png", 100), None);
    }

    /// CRC-32 (IEEE), as PNG chunks use it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for b in bytes {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
