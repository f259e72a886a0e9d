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

/// `text` as a black-on-white QR code in an 8-bit grayscale PNG (8 px per module, 4-module
/// quiet zone). A 100-character link gives a PNG of about 2 KB.
///
/// # Errors
/// [`QrError`] when the text is too long for a QR code.
pub fn qr_png(text: &str) -> Result<Vec<u8>, QrError> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != qrcode::Color::Dark {
            continue;
        }
        let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
        for y in my * SCALE..(my + 1) * SCALE {
            pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
        }
    }
    let mut out = Vec::with_capacity(4096);
    {
        let mut enc = png::Encoder::new(&mut out, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
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
}
