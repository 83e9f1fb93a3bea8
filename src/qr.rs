//! The pairing QR code as an image: SVG (scales anywhere, small) or PNG (for clients that
//! want a bitmap). Both have the 4-module quiet zone phones need to find the code.

use qrcode::render::svg;
use qrcode::{Color, EcLevel, QrCode};

/// Pixels per module in the PNG.
const PNG_SCALE: usize = 8;
/// Modules of white border on each side (the QR standard's quiet zone).
const QUIET_ZONE: usize = 4;

/// A payload too long to encode (WhatsApp's are a few hundred bytes; this is a guard).
#[derive(Debug, thiserror::Error)]
#[error("the QR payload cannot be encoded: {0}")]
pub struct QrError(String);

fn encode(data: &str) -> Result<QrCode, QrError> {
    // Level L like WhatsApp Web: the densest code is the easiest to scan from a screen.
    QrCode::with_error_correction_level(data.as_bytes(), EcLevel::L)
        .map_err(|e| QrError(e.to_string()))
}

/// The code as a standalone SVG document.
pub fn svg(data: &str) -> Result<String, QrError> {
    Ok(encode(data)?
        .render::<svg::Color>()
        .min_dimensions(264, 264)
        .quiet_zone(true)
        .build())
}

/// The code as an 8-bit greyscale PNG, 8 pixels per module.
pub fn png(data: &str) -> Result<Vec<u8>, QrError> {
    let code = encode(data)?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET_ZONE) * PNG_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color != Color::Dark {
            continue;
        }
        let (mx, my) = (i % modules + QUIET_ZONE, i / modules + QUIET_ZONE);
        for y in my * PNG_SCALE..(my + 1) * PNG_SCALE {
            pixels[y * side + mx * PNG_SCALE..y * side + (mx + 1) * PNG_SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| QrError(e.to_string()))?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| QrError(e.to_string()))?;
    writer.finish().map_err(|e| QrError(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: &str = "2@abc,def,ghi,jkl";

    #[test]
    fn svg_is_a_document_with_dark_modules() {
        let s = svg(PAYLOAD).unwrap();
        assert!(s.starts_with("<?xml"), "{}", &s[..40]);
        assert!(s.contains("<svg") && s.contains("#000"));
    }

    #[test]
    fn png_decodes_to_the_code_with_its_quiet_zone() {
        let bytes = png(PAYLOAD).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let code = encode(PAYLOAD).unwrap();
        let side = (code.width() + 2 * QUIET_ZONE) * PNG_SCALE;
        assert_eq!((info.width as usize, info.height as usize), (side, side));
        // The border is white; each module's pixels match the code.
        assert!(buf[..side * QUIET_ZONE * PNG_SCALE]
            .iter()
            .all(|&p| p == 255));
        for (i, color) in code.to_colors().iter().enumerate() {
            let (mx, my) = (i % code.width() + QUIET_ZONE, i / code.width() + QUIET_ZONE);
            let px = buf[(my * PNG_SCALE + 3) * side + mx * PNG_SCALE + 3];
            assert_eq!(px == 0, *color == Color::Dark, "module {i}");
        }
    }
}
