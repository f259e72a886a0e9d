//! A subscriber's key: the `vless://` link built from the node's public settings, and the same
//! link as a QR code in a PNG (the `qrcode` crate for the matrix, `png` for the file).

use uuid::Uuid;

/// Pixels per QR module.
const SCALE: usize = 8;
/// Quiet zone around the code, in modules (the standard asks for 4).
const QUIET: usize = 4;

/// `vless://UUID@HOST:PORT?PARAMS#LABEL`; an IPv6 host is bracketed and the label is
/// percent-encoded.
pub fn vless_link(uuid: Uuid, host: &str, port: u16, params: &str, label: &str) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let label: String = url::form_urlencoded::byte_serialize(label.as_bytes())
        .collect::<String>()
        .replace('+', "%20");
    let q = if params.is_empty() {
        String::new()
    } else {
        format!("?{params}")
    };
    format!("vless://{uuid}@{host}:{port}{q}#{label}")
}

/// Why a QR image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit a QR code.
    #[error("QR encoding: {0}")]
    Encode(#[from] qrcode::types::QrError),
    /// PNG encoding failed.
    #[error("PNG encoding: {0}")]
    Png(#[from] png::EncodingError),
}

/// `text` as a black-on-white QR code in a 1-bit grayscale PNG (8 px per module, 4-module
/// quiet zone). A 100-character link gives a PNG of well under 2 KB.
///
/// One bit per pixel: a QR code has two colours, and deflating an eighth of the bytes is what
/// makes this cheap enough to run for every `/trial` of a burst (it runs on the blocking pool,
/// which shares the cores with the runtime's workers).
///
/// # Errors
/// [`QrError`] when the text is too long for a QR code.
pub fn qr_png(text: &str) -> Result<Vec<u8>, QrError> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET) * SCALE;
    // Rows of `stride` bytes, most significant bit first, 1 = white (PNG grayscale, depth 1);
    // the bits past `side` in a row's last byte are padding.
    let stride = side.div_ceil(8);
    let mut pixels = vec![0xFFu8; stride * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != qrcode::Color::Dark {
            continue;
        }
        let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
        for y in my * SCALE..(my + 1) * SCALE {
            let row = &mut pixels[y * stride..(y + 1) * stride];
            for x in mx * SCALE..(mx + 1) * SCALE {
                row[x / 8] &= !(0x80 >> (x % 8));
            }
        }
    }
    let mut out = Vec::with_capacity(2048);
    {
        let mut enc = png::Encoder::new(&mut out, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::One);
        let mut w = enc.write_header()?;
        w.write_image_data(&pixels)?;
        w.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_has_the_vless_shape() {
        let id = Uuid::nil();
        assert_eq!(
            vless_link(id, "vpn.example.com", 443, "encryption=none&type=tcp", "my vpn"),
            "vless://00000000-0000-0000-0000-000000000000@vpn.example.com:443?encryption=none&type=tcp#my%20vpn"
        );
        assert!(vless_link(id, "2001:db8::1", 8443, "", "x").contains("@[2001:db8::1]:8443#x"));
    }

    #[test]
    fn qr_is_a_png_whose_size_follows_the_modules() {
        let png = qr_png("vless://00000000-0000-0000-0000-000000000000@h:443#x").unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(&png));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!(info.width, info.height);
        assert_eq!(info.width as usize % SCALE, 0);
        assert!(qr_png(&"x".repeat(10_000)).is_err());
    }

    /// Every pixel of the image is the colour of its module (quiet zone white), read back
    /// through a PNG decoder expanded to 8 bits per pixel.
    #[test]
    fn qr_pixels_are_the_modules() {
        let text = "vless://00000000-0000-0000-0000-000000000000@vpn.example.com:443?encryption=none#trial";
        let png = qr_png(text).unwrap();
        assert!(png.len() < 2048, "{} bytes", png.len());
        let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M).unwrap();
        let (modules, colors) = (code.width(), code.to_colors());
        let mut dec = png::Decoder::new(std::io::Cursor::new(&png));
        dec.set_transformations(png::Transformations::EXPAND);
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut buf).unwrap();
        let side = frame.width as usize;
        assert_eq!(side, (modules + 2 * QUIET) * SCALE);
        assert_eq!(frame.bit_depth, png::BitDepth::Eight);
        let mut dark = 0;
        for y in 0..side {
            for x in 0..side {
                let (mx, my) = (x / SCALE, y / SCALE);
                let inside = (QUIET..QUIET + modules).contains(&mx)
                    && (QUIET..QUIET + modules).contains(&my);
                let want_dark =
                    inside && colors[(my - QUIET) * modules + (mx - QUIET)] == qrcode::Color::Dark;
                let px = buf[y * frame.line_size + x];
                assert_eq!(px == 0, want_dark, "pixel ({x}, {y}) is {px}");
                assert!(px == 0 || px == 255, "pixel ({x}, {y}) is {px}");
                dark += usize::from(want_dark);
            }
        }
        assert!(dark > 0);
    }
}
