//! An HPACK decoder (RFC 7541), enough to read the first header block of an
//! HTTP/2 connection before hyper does.
//!
//! Why our own: the `h2` crate keeps its decoder private, and the crates
//! that publish one are unmaintained (`hpack`, 2016; `httlib-hpack`, 2021)
//! or the experimental part of another project (`loona-hpack`, which also
//! builds two hash maps for every Huffman string it decodes and looks up
//! every bit in them: ~8,000 lookups for one ServiceAccount token). What the
//! peek needs is small: integers, strings (raw or Huffman), the static
//! table and a dynamic table that starts empty. The Huffman code is
//! canonical, so the 256 code lengths of Appendix B are the whole table,
//! and decoding walks it one bit at a time with three small arrays built at
//! compile time.
//!
//! Everything is bounded by the block it is given (at most the peek's 16
//! KiB): the dynamic table by the 4,096 octets HTTP/2 allows before our
//! SETTINGS, strings by the block.

/// The dynamic table's size before the server's SETTINGS are acknowledged
/// (`SETTINGS_HEADER_TABLE_SIZE`'s initial value); hyper keeps it.
const MAX_TABLE_SIZE: usize = 4096;

/// Why a block could not be decoded: the peek then leaves it to hyper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block truncated")]
    Truncated,
    #[error("integer too large")]
    Integer,
    #[error("no table entry at this index")]
    Index,
    #[error("bad Huffman string")]
    Huffman,
    #[error("dynamic table size update over the limit or out of place")]
    SizeUpdate,
}

/// A decoded field: name and value.
type Field = (Box<[u8]>, Box<[u8]>);

/// One connection's decoding state: the dynamic table.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Newest first, as HPACK indexes it.
    table: std::collections::VecDeque<Field>,
    size: usize,
    max: Option<usize>,
}

impl Decoder {
    /// Decodes one complete header block (HEADERS plus CONTINUATION
    /// fragments, joined), calling `field` with each name and value in order.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut fields_seen = false;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field (6.1).
                let (index, rest) = integer(block, 7)?;
                let (name, value) = self.entry(index)?;
                field(name, value);
                block = rest;
            } else if first & 0xc0 == 0x40 {
                // Literal with incremental indexing (6.2.1): added to the
                // dynamic table, so that later fields may refer to it.
                let ((name, value), rest) = self.literal(block, 6)?;
                field(&name, &value);
                self.insert(name, value);
                block = rest;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (6.3): only before the first
                // field of a block.
                let (size, rest) = integer(block, 5)?;
                if fields_seen || size > MAX_TABLE_SIZE {
                    return Err(HpackError::SizeUpdate);
                }
                self.max = Some(size);
                self.evict(0);
                block = rest;
                continue;
            } else {
                // Literal without indexing or never indexed (6.2.2, 6.2.3).
                let ((name, value), rest) = self.literal(block, 4)?;
                field(&name, &value);
                block = rest;
            }
            fields_seen = true;
        }
        Ok(())
    }

    /// Field `index` of the static table followed by the dynamic one.
    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::Index),
            i if i <= STATIC.len() => {
                let (name, value) = STATIC[i - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            i => self
                .table
                .get(i - STATIC.len() - 1)
                .map(|(n, v)| (&**n, &**v))
                .ok_or(HpackError::Index),
        }
    }

    /// A literal field whose name index has a `prefix`-bit prefix.
    fn literal<'b>(&self, block: &'b [u8], prefix: u8) -> Result<(Field, &'b [u8]), HpackError> {
        let (index, rest) = integer(block, prefix)?;
        let (name, rest) = if index == 0 {
            string(rest)?
        } else {
            (self.entry(index)?.0.into(), rest)
        };
        let (value, rest) = string(rest)?;
        Ok(((name, value), rest))
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        // 4.1: an entry's size counts 32 octets of overhead.
        let size = name.len() + value.len() + 32;
        self.evict(size);
        if size <= self.max() {
            self.size += size;
            self.table.push_front((name, value));
        } else {
            // 4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
        }
    }

    /// Drops the oldest entries until `room` more octets fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max() {
            let Some((n, v)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }

    fn max(&self) -> usize {
        self.max.unwrap_or(MAX_TABLE_SIZE)
    }
}

/// An integer with an `n`-bit prefix (5.1), and the rest of the block.
fn integer(block: &[u8], n: u8) -> Result<(usize, &[u8]), HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let mask = (1u16 << n) as usize - 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok((value, rest));
    }
    // Four continuation octets reach 2^28: far past anything a 16 KiB
    // block can hold; more is refused rather than risk an overflow.
    for shift in (0..28).step_by(7) {
        let (&b, tail) = rest.split_first().ok_or(HpackError::Truncated)?;
        rest = tail;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
    Err(HpackError::Integer)
}

/// A string literal (5.2), raw or Huffman-coded, and the rest of the block.
fn string(block: &[u8]) -> Result<(Box<[u8]>, &[u8]), HpackError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let (len, rest) = integer(block, 7)?;
    if rest.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = rest.split_at(len);
    let value = if huffman {
        huffman_decode(raw)?.into_boxed_slice()
    } else {
        raw.into()
    };
    Ok((value, rest))
}

/// Decodes a Huffman-coded string (5.2, Appendix B).
///
/// The code is canonical: codes of one length are consecutive numbers, in
/// symbol order, and each length's first code follows from the shorter
/// ones. So a code of `len` bits is symbol `BY_CODE[OFFSET[len] + code -
/// FIRST[len]]` when `code - FIRST[len] < COUNT[len]`.
fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, HpackError> {
    // Codes are 5 bits or more: at most 8/5 symbols per octet.
    let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in raw {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            let first = HUFFMAN.first[len];
            if code >= first && code - first < HUFFMAN.count[len] {
                let at = HUFFMAN.offset[len] + (code - first) as usize;
                out.push(HUFFMAN.by_code[at]);
                (code, len) = (0, 0);
            } else if len >= 30 {
                // Only EOS (30 ones) is this long, and it may not appear.
                return Err(HpackError::Huffman);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (the start of EOS).
    if len > 7 || code != (1 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// The canonical code's tables, indexed by code length (1..=30).
struct Huffman {
    /// How many symbols have a code of this length.
    count: [u32; 31],
    /// The first code of this length.
    first: [u32; 31],
    /// Where this length's symbols start in `by_code`.
    offset: [usize; 31],
    /// The symbols in code order (by length, then by symbol).
    by_code: [u8; 256],
}

const HUFFMAN: Huffman = {
    let mut h = Huffman {
        count: [0; 31],
        first: [0; 31],
        offset: [0; 31],
        by_code: [0; 256],
    };
    let mut s = 0;
    while s < 256 {
        h.count[CODE_LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let (mut code, mut at, mut len) = (0u32, 0usize, 1);
    while len <= 30 {
        h.first[len] = code;
        h.offset[len] = at;
        let mut s = 0;
        while s < 256 {
            if CODE_LENGTHS[s] as usize == len {
                h.by_code[at] = s as u8;
                at += 1;
            }
            s += 1;
        }
        code = (code + h.count[len]) << 1;
        len += 1;
    }
    h
};

/// The code length of each symbol (RFC 7541 Appendix B; EOS, 256, is 30
/// ones and never decoded).
const CODE_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

/// The static table (Appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn fields(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(block, |n, v| {
            out.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ))
        })
        .expect("decodes");
        out
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_rfc_examples_with_huffman_decode_across_three_requests() {
        // RFC 7541 C.4: one connection, the dynamic table carried over.
        let mut d = Decoder::default();
        let first = fields(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(
            first,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        let second = fields(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(second[3], pairs(&[(":authority", "www.example.com")])[0]);
        assert_eq!(second[4], pairs(&[("cache-control", "no-cache")])[0]);
        let third = fields(
            &mut d,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        );
        assert_eq!(
            third,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
    }

    #[test]
    fn a_field_indexed_earlier_in_the_same_block_is_found() {
        // C.2.1's literal with indexing, then index 62 (the newest entry).
        let block = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572 be");
        let got = fields(&mut Decoder::default(), &block);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], got[1]);
        assert_eq!(got[1], pairs(&[("custom-key", "custom-header")])[0]);
    }

    #[test]
    fn every_byte_survives_a_huffman_round_trip() {
        // Encode with the same lengths (canonical codes), then decode.
        let mut codes = [0u32; 256];
        for len in 1..=30 {
            for i in 0..HUFFMAN.count[len] {
                let sym = HUFFMAN.by_code[HUFFMAN.offset[len] + i as usize];
                codes[usize::from(sym)] = HUFFMAN.first[len] + i;
            }
        }
        let input: Vec<u8> = (0..=255u8)
            .chain(b"Bearer eyJhbGciOiJSUzI1NiJ9.x-y_z".iter().copied())
            .collect();
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &b in &input {
            let len = u32::from(CODE_LENGTHS[usize::from(b)]);
            acc = (acc << len) | u64::from(codes[usize::from(b)]);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        assert_eq!(huffman_decode(&out).expect("decodes"), input);
        // The known codes: '0' is 00000, 'a' 00011, EOS's start pads.
        assert_eq!(codes[usize::from(b'0')], 0);
        assert_eq!(codes[usize::from(b'a')], 3);
        assert_eq!(huffman_decode(&[0x1f]).expect("'a' padded"), b"a");
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut d = Decoder::default();
        for block in [
            &[0x80][..],                           // index 0
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // integer overflow
            &[0xbe],                               // empty dynamic table
            &[0x40, 0x05, b'a'],                   // truncated name
            &[0x00, 0x81, 0x00, 0x00],             // bad Huffman padding
            &[0x82, 0x3f, 0xe1, 0x1f],             // size update after a field
            &[0x3f, 0xe2, 0x1f],                   // size update over 4,096
        ] {
            assert!(d.decode(block, |_, _| {}).is_err(), "{block:02x?}");
        }
    }
}
