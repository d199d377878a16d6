//! A walk over a GGUF file's header before candle reads it. candle's reader trusts the counts
//! and lengths it finds: a garbage count allocates without bound (an abort), a zero alignment
//! divides by zero (a panic), a garbage tensor extent reads past the end. This check reads the
//! same layout with every count, length and extent held against the file's size first, and
//! names the file and the field at fault.

use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

/// The most dimensions a GGUF tensor has (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are allowed; deeper nesting is not something a model file holds.
const MAX_NESTING: usize = 3;
const DEFAULT_ALIGNMENT: u64 = 32;

struct Walker<R> {
    reader: R,
    /// Bytes read so far.
    at: u64,
    size: u64,
    /// GGUF v1 writes counts and lengths as u32; v2 and v3 as u64.
    wide: bool,
}

fn bad(path: &Path, msg: String) -> Error {
    Error::file(path, format!("not a valid GGUF file: {msg}"))
}

impl<R: Read> Walker<R> {
    fn bytes(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.size - self.at {
            return Err(format!(
                "{what} needs {n} bytes at offset {}, the file has {} left",
                self.at,
                self.size - self.at
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.reader.read_exact(&mut buf).map_err(|e| format!("{what}: {e}"))?;
        self.at += n;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// A count or length (u32 in v1, u64 after).
    fn len(&mut self, what: &str) -> std::result::Result<u64, String> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// A count of items of at least `min_item` bytes each, checked against what is left.
    fn count(&mut self, what: &str, min_item: u64) -> std::result::Result<u64, String> {
        let n = self.len(what)?;
        let left = self.size - self.at;
        if n.checked_mul(min_item).is_none_or(|b| b > left) {
            return Err(format!("{what} is {n}, but {left} bytes cannot hold that many"));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.len(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// Skips one metadata value of `kind`; returns it as an integer when it is one (for
    /// `general.alignment`).
    fn value(
        &mut self,
        kind: u32,
        key: &str,
        depth: usize,
    ) -> std::result::Result<Option<u64>, String> {
        let fixed = |k: u32| -> Option<u64> {
            match k {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            }
        };
        match kind {
            8 => self.string(&format!("string value of `{key}`")).map(|_| None),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!("`{key}`: arrays nested deeper than {MAX_NESTING}"));
                }
                let elem = self.u32(&format!("array type of `{key}`"))?;
                let min = fixed(elem).unwrap_or(if elem == 8 || elem == 9 { 8 } else { 0 });
                if min == 0 {
                    return Err(format!("`{key}`: unknown array element type {elem}"));
                }
                let n = self.count(&format!("array length of `{key}`"), min)?;
                match fixed(elem) {
                    Some(size) => {
                        // n * size <= left was checked: skip in chunks.
                        let mut left = n * size;
                        while left > 0 {
                            let step = left.min(1 << 20);
                            self.bytes(step, &format!("array `{key}`"))?;
                            left -= step;
                        }
                    }
                    None => {
                        for _ in 0..n {
                            self.value(elem, key, depth + 1)?;
                        }
                    }
                }
                Ok(None)
            }
            k => match fixed(k) {
                Some(size) => {
                    let b = self.bytes(size, &format!("value of `{key}`"))?;
                    let signed_negative = matches!(k, 1 | 3 | 5 | 11) && b[b.len() - 1] & 0x80 != 0;
                    let mut v = [0u8; 8];
                    v[..b.len()].copy_from_slice(&b);
                    let int = matches!(k, 0..=5 | 10 | 11) && !signed_negative;
                    Ok(int.then(|| u64::from_le_bytes(v)))
                }
                None => Err(format!("`{key}`: unknown value type {k}")),
            },
        }
    }
}

fn dtype_of(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Checks the header of the GGUF file at `path`: magic and version, every metadata entry, every
/// tensor's name, shape, type and extent, and the alignment, all within the file.
pub fn check_gguf(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut w = Walker { reader: BufReader::new(file), at: 0, size, wide: true };
    walk(&mut w).map_err(|m| bad(path, m))
}

fn walk<R: Read>(w: &mut Walker<R>) -> std::result::Result<(), String> {
    let magic = w.bytes(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format!("magic {magic:?}, expected \"GGUF\""));
    }
    let version = w.u32("version")?;
    w.wide = match version {
        1 => false,
        2 | 3 => true,
        v => return Err(format!("version {v} (1, 2 or 3 are known)")),
    };
    let min_len = if w.wide { 8 } else { 4 };
    let tensors = w.len("tensor count")?;
    // A metadata entry takes at least a key length, a type and one byte.
    let entries = w.count("metadata entry count", min_len + 4 + 1)?;
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..entries {
        let key = w.string(&format!("key of metadata entry {i}"))?;
        let kind = w.u32(&format!("type of `{key}`"))?;
        let value = w.value(kind, &key, 0)?;
        if key == "general.alignment" {
            match (kind, value) {
                // candle reads 8, 16 and 32-bit integers here and ignores other types.
                (0..=5, Some(v)) if v == 0 || !v.is_power_of_two() => {
                    return Err(format!("general.alignment is {v}, not a power of two"))
                }
                (0..=5, Some(v)) => alignment = v,
                (0..=5, None) => return Err("general.alignment is negative".into()),
                _ => {}
            }
        }
    }
    // A tensor info takes at least a name length, its dimension count, a type and an offset.
    let left = w.size - w.at;
    if tensors.checked_mul(min_len + 4 + 4 + 8).is_none_or(|b| b > left) {
        return Err(format!("tensor count is {tensors}, but {left} bytes cannot hold that many"));
    }
    let mut extents = Vec::with_capacity(tensors as usize);
    for i in 0..tensors {
        let name = w.string(&format!("name of tensor {i}"))?;
        let dims = w.u32(&format!("dimension count of `{name}`"))?;
        if dims > MAX_DIMS {
            return Err(format!("`{name}` has {dims} dimensions (at most {MAX_DIMS})"));
        }
        let mut elements: u64 = 1;
        for d in 0..dims {
            let n = w.len(&format!("dimension {d} of `{name}`"))?;
            elements = elements
                .checked_mul(n)
                .filter(|e| *e <= w.size.saturating_mul(8))
                .ok_or_else(|| format!("`{name}` has more elements than its file could hold"))?;
        }
        let type_id = w.u32(&format!("type of `{name}`"))?;
        let dtype = dtype_of(type_id)
            .ok_or_else(|| format!("`{name}` has unknown tensor type {type_id}"))?;
        let block = dtype.block_size() as u64;
        if !elements.is_multiple_of(block) {
            return Err(format!("`{name}`: {elements} elements are not whole blocks of {block}"));
        }
        let bytes = elements / block * dtype.type_size() as u64;
        let offset = w.u64(&format!("offset of `{name}`"))?;
        extents.push((name, offset, bytes));
    }
    let data_start = w.at.div_ceil(alignment) * alignment;
    for (name, offset, bytes) in extents {
        let end = data_start.checked_add(offset).and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|e| e > w.size) {
            return Err(format!(
                "`{name}` ({bytes} bytes at offset {offset} of the data) ends past the file's {} bytes",
                w.size
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 file: one u32 entry, one string entry, one f32 tensor of 4 values.
    fn valid() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // entries
        let key = |b: &mut Vec<u8>, k: &str| {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
        };
        key(&mut b, "general.alignment");
        b.extend(4u32.to_le_bytes());
        b.extend(32u32.to_le_bytes());
        key(&mut b, "general.name");
        b.extend(8u32.to_le_bytes());
        key(&mut b, "tiny");
        key(&mut b, "w");
        b.extend(1u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // f32
        b.extend(0u64.to_le_bytes()); // offset
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend([0u8; 16]);
        b
    }

    fn check(bytes: &[u8]) -> std::result::Result<(), String> {
        let size = bytes.len() as u64;
        walk(&mut Walker { reader: bytes, at: 0, size, wide: true })
    }

    #[test]
    fn a_valid_header_passes_and_each_corruption_is_named() {
        check(&valid()).unwrap();
        let patch = |at: usize, with: &[u8]| {
            let mut b = valid();
            b[at..at + with.len()].copy_from_slice(with);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (patch(0, b"GGML"), "magic"),
            (patch(4, &9u32.to_le_bytes()), "version"),
            (patch(8, &u64::MAX.to_le_bytes()), "tensor count"),
            (patch(16, &u64::MAX.to_le_bytes()), "metadata entry count"),
            (patch(24, &u64::MAX.to_le_bytes()), "key of metadata entry 0"),
            (patch(24 + 8 + 17, &77u32.to_le_bytes()), "unknown value type"),
            (patch(24 + 8 + 17 + 4, &0u32.to_le_bytes()), "general.alignment is 0"),
            (patch(24 + 8 + 17 + 4, &24u32.to_le_bytes()), "power of two"),
            (valid()[..60].to_vec(), "bytes at offset"),
            (valid()[..valid().len() - 8].to_vec(), "ends past the file"),
        ];
        for (bytes, want) in cases {
            let e = check(&bytes).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn tensor_fields_are_checked() {
        let v = valid();
        // Locate the tensor info: its name `w` follows the last entry.
        let name_at = v.windows(9).position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'w']).unwrap();
        let dims_at = name_at + 9;
        let shape_at = dims_at + 4;
        let type_at = shape_at + 8;
        let offset_at = type_at + 4;
        let patch = |at: usize, with: &[u8]| {
            let mut b = v.clone();
            b[at..at + with.len()].copy_from_slice(with);
            b
        };
        for (bytes, want) in [
            (patch(dims_at, &9u32.to_le_bytes()), "dimensions"),
            (patch(shape_at, &u64::MAX.to_le_bytes()), "more elements"),
            (patch(type_at, &99u32.to_le_bytes()), "unknown tensor type"),
            (patch(type_at, &2u32.to_le_bytes()), "whole blocks"),
            (patch(offset_at, &u64::MAX.to_le_bytes()), "ends past the file"),
        ] {
            let e = check(&bytes).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn the_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.gguf");
        std::fs::write(&p, b"GGUF\x03\0\0\0").unwrap();
        let e = check_gguf(&p).unwrap_err().to_string();
        assert!(e.contains("broken.gguf") && e.contains("tensor count"), "{e}");
    }
}
