//! The chunked transfer coding (RFC 9112 section 7.1), strictly: a size of 1 to 15 hex digits,
//! optional extensions, CRLF line ends only, lines of at most 4 KiB, trailers skipped. Pure:
//! it says which bytes are data and which are framing; the framing tracker follows client
//! bodies with it, the upstream exchange reads response bodies with it.

/// Longest chunk-size or trailer line accepted, extensions included.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits; `digits` so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace or `;extension` after the size, up to CR.
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section after the last chunk: at a line start.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    at: Chunk,
    /// Bytes of the current size or trailer line.
    line: usize,
}

/// What the front of the input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// This many bytes of chunk data.
    Data(usize),
    /// This many bytes of framing, all consumed (the whole input, or up to chunk data).
    Framing(usize),
    /// The body ends after this many bytes of framing.
    End(usize),
}

/// The coding is broken; nothing after it can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked framing")]
pub struct BadChunk;

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            at: Chunk::Size {
                value: 0,
                digits: 0,
            },
            line: 0,
        }
    }
}

impl Chunked {
    /// Looks at the front of `bytes` (not empty) and moves past it.
    pub fn next(&mut self, bytes: &[u8]) -> Result<Next, BadChunk> {
        if let Chunk::Data(left) = self.at {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
            let left = left - n as u64;
            self.at = if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            };
            return Ok(Next::Data(n));
        }
        for (i, &b) in bytes.iter().enumerate() {
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(BadChunk);
            }
            self.at = match (self.at, b) {
                (Chunk::Size { value, digits }, _) if b.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err(BadChunk);
                    }
                    let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                    Chunk::Size {
                        value: (value << 4) | d,
                        digits: digits + 1,
                    }
                }
                // A size needs at least one digit: no sign, no "0x", no leading space.
                (Chunk::Size { digits: 0, .. }, _) => return Err(BadChunk),
                (Chunk::Size { value, .. }, b'\r') => Chunk::SizeLf(value),
                (Chunk::Size { value, .. }, b' ' | b'\t' | b';') => Chunk::Ext(value),
                (Chunk::Size { .. }, _) => return Err(BadChunk),
                (Chunk::Ext(v), b'\r') => Chunk::SizeLf(v),
                (Chunk::Ext(_), b'\n') => return Err(BadChunk),
                (Chunk::Ext(v), _) => Chunk::Ext(v),
                (Chunk::SizeLf(0), b'\n') => {
                    self.line = 0;
                    Chunk::TrailerStart
                }
                (Chunk::SizeLf(n), b'\n') => {
                    self.line = 0;
                    self.at = Chunk::Data(n);
                    return Ok(Next::Framing(i + 1));
                }
                (Chunk::SizeLf(_), _) => return Err(BadChunk),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => {
                    self.line = 0;
                    Chunk::Size {
                        value: 0,
                        digits: 0,
                    }
                }
                (Chunk::DataCr | Chunk::DataLf, _) => return Err(BadChunk),
                (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
                (Chunk::TrailerStart | Chunk::TrailerLine, b'\n') => return Err(BadChunk),
                (Chunk::TrailerLine, b'\r') => Chunk::TrailerLf,
                (Chunk::TrailerStart | Chunk::TrailerLine, _) => Chunk::TrailerLine,
                (Chunk::TrailerLf, b'\n') => {
                    self.line = 0;
                    Chunk::TrailerStart
                }
                (Chunk::TrailerLf, _) => return Err(BadChunk),
                (Chunk::EndLf, b'\n') => {
                    *self = Chunked::default();
                    return Ok(Next::End(i + 1));
                }
                (Chunk::EndLf, _) => return Err(BadChunk),
                // Left above, before any byte is looked at.
                (Chunk::Data(_), _) => return Err(BadChunk),
            };
        }
        Ok(Next::Framing(bytes.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` one byte at a time (every split point): the data, and whether it ended.
    fn decode_bytewise(wire: &[u8]) -> Result<(Vec<u8>, bool), BadChunk> {
        let mut d = Chunked::default();
        let mut out = Vec::new();
        for b in wire.chunks(1) {
            match d.next(b)? {
                Next::Data(n) => out.extend_from_slice(&b[..n]),
                Next::Framing(_) => {}
                Next::End(_) => return Ok((out, true)),
            }
        }
        Ok((out, false))
    }

    #[test]
    fn decodes_at_every_split_and_refuses_what_is_not_strict() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";
        assert_eq!(
            decode_bytewise(wire),
            Ok((b"hello0123456789".to_vec(), true))
        );
        let mut d = Chunked::default();
        assert_eq!(d.next(wire), Ok(Next::Framing(9)), "up to the first data");
        assert_eq!(d.next(&wire[9..]), Ok(Next::Data(5)));
        assert_eq!(
            decode_bytewise(b"3\r\nabc\r\n0\r\n"),
            Ok((b"abc".to_vec(), false))
        );
        for bad in [
            &b"x\r\n"[..],
            b"3\r\nabcd\r\n",
            b"\r\n",
            b"3\nabc\r\n",
            b"1111111111111111\r\n",
        ] {
            assert_eq!(
                decode_bytewise(bad),
                Err(BadChunk),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
