//! HTTP/1.1 message framing as the agent's client connections see it, byte for byte.
//!
//! hyper is lenient where a front proxy may not be: it accepts `Content-Length` beside
//! `Transfer-Encoding: chunked` (dropping the length), repeated equal lengths, `gzip, chunked`,
//! and bare LF line ends. Each of these lets two parsers disagree about where a request ends
//! (request smuggling). The [`Tracker`] follows the raw bytes hyper reads, parses every request
//! head itself, and queues one verdict per head; the server hands each verdict to the request
//! hyper parsed from that head, and the proxy answers a bad one with 400 and closes.
//!
//! Pure: bytes and the time in, verdicts out (fuzzed).

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::time::Instant;

use super::chunked::{Chunked, Next};

/// Verdicts waiting for their request: pipelining deeper than this closes the connection.
const MAX_QUEUED: usize = 256;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndChunked,
    #[error("more than one Content-Length")]
    DuplicateLength,
    #[error("invalid Content-Length")]
    BadLength,
    #[error("Transfer-Encoding other than chunked")]
    BadTransferEncoding,
    #[error("bare LF or CR in the request head")]
    BareLineEnd,
    #[error("malformed request head")]
    Malformed,
    #[error("request head too large")]
    TooLarge,
    #[error("invalid chunked body framing")]
    BadChunk,
}

impl HeadError {
    /// Short static label (the `denied_requests` reason).
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::LengthAndChunked => "length_and_chunked",
            HeadError::DuplicateLength => "duplicate_length",
            HeadError::BadLength => "bad_length",
            HeadError::BadTransferEncoding => "bad_transfer_encoding",
            HeadError::BareLineEnd => "bare_line_end",
            HeadError::Malformed => "malformed_head",
            HeadError::TooLarge => "head_too_large",
            HeadError::BadChunk => "bad_chunk",
        }
    }
}

/// Why the connection must end now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("too many pipelined requests")]
    TooDeep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    Chunked(Chunked),
    /// Not HTTP/1 framing any more: h2c, CONNECT tunnel, or after a refused head.
    Passthrough,
}

/// What the tracker knows of one connection.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    head: Vec<u8>,
    /// Where the search for the end of the head resumes.
    scanned: usize,
    max_head: usize,
    max_headers: usize,
    verdicts: VecDeque<Result<(), HeadError>>,
    /// When the current head's first byte arrived.
    head_since: Option<Instant>,
    /// The own HTTP/1.1 path parses heads itself (see [`Tracker::defer`]).
    deferred: bool,
    heads: u64,
    /// Set when a head was refused: every later request is refused too.
    poisoned: Option<HeadError>,
}

impl Tracker {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            scanned: 0,
            max_head,
            max_headers: max_headers.max(1),
            verdicts: VecDeque::new(),
            head_since: None,
            deferred: false,
            heads: 0,
            poisoned: None,
        }
    }

    /// When the head being read began, if one is being read.
    pub fn head_since(&self) -> Option<Instant> {
        self.head_since
    }

    /// Whether this connection has stopped being HTTP/1 (h2c or a tunnel).
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough && self.poisoned.is_none()
    }

    /// The verdict for the next request hyper hands over. `None`: not tracked (h2c, tunnel).
    pub fn next_verdict(&mut self) -> Option<Result<(), HeadError>> {
        if let Some(v) = self.verdicts.pop_front() {
            return Some(v);
        }
        if let Some(e) = self.poisoned {
            return Some(Err(e));
        }
        if self.state == State::Passthrough {
            return None;
        }
        // hyper parsed a head this tracker has not seen: the two disagree, refuse.
        Some(Err(HeadError::Malformed))
    }

    /// The own HTTP/1.1 path (`conn::h1`) parses heads itself, so each is parsed once: from
    /// here `feed` only notes when a head begins; the path reports each head it takes with
    /// [`Tracker::own_head`] and, before hyper reads on, gives back what it has not parsed
    /// with [`Tracker::resume`]. Only at a connection's start.
    pub fn defer(&mut self) {
        if self.state == State::Head && self.head.is_empty() && self.verdicts.is_empty() {
            self.deferred = true;
        }
    }

    /// Whether heads are left to the own path.
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// Whether a head of `len` bytes and `lines` header lines is within the limits (else the
    /// own path hands it to hyper, and this tracker refuses it).
    pub fn within_limits(&self, len: usize, lines: usize) -> bool {
        len <= self.max_head && lines <= self.max_headers
    }

    /// The own path took a whole head, bodyless and within the limits: its verdict is queued
    /// as [`Tracker::feed`] would have made it. `next_since`: bytes of the next head follow,
    /// read by then.
    pub fn own_head(
        &mut self,
        head: &[u8],
        next_since: Option<Instant>,
    ) -> Result<(), StreamError> {
        self.heads += 1;
        self.head_since = next_since;
        // After a refused head every later one is refused too, as `feed` would.
        if let Some(e) = self.poisoned {
            return self.push(Err(e));
        }
        let start = head.iter().position(|b| !matches!(b, b'\r' | b'\n'));
        if bare_line_end(&head[start.unwrap_or(head.len())..]) {
            self.refuse(HeadError::BareLineEnd)
        } else {
            self.push(Ok(()))
        }
    }

    /// The own path hands over: `unread`, the bytes it read but did not parse, are followed
    /// now, and so is everything after. A head begun before keeps its start time.
    pub fn resume(&mut self, unread: &[u8], now: Instant) -> Result<(), StreamError> {
        if !std::mem::take(&mut self.deferred) {
            return Ok(());
        }
        let since = self.head_since.take().unwrap_or(now);
        self.feed(unread, since)
    }

    /// Follows `bytes`, read from the client at `now`.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), StreamError> {
        if self.deferred {
            // Empty lines before a request line do not start a head (as in `feed_head`).
            if self.head_since.is_none() && bytes.iter().any(|b| !matches!(b, b'\r' | b'\n')) {
                self.head_since = Some(now);
            }
            return Ok(());
        }
        while !bytes.is_empty() {
            match self.state {
                State::Passthrough => return Ok(()),
                State::Head => bytes = self.feed_head(bytes, now)?,
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::Chunked(c) => match self.feed_chunked(c, bytes) {
                    Some(rest) => bytes = rest,
                    None => self.bad_body(),
                },
            }
        }
        Ok(())
    }

    fn feed_head<'a>(
        &mut self,
        mut bytes: &'a [u8],
        now: Instant,
    ) -> Result<&'a [u8], StreamError> {
        if self.head.is_empty() {
            // Empty lines before a request line are ignored (RFC 9112 section 2.2).
            while let [b'\r' | b'\n', rest @ ..] = bytes {
                bytes = rest;
            }
            if bytes.is_empty() {
                return Ok(bytes);
            }
            self.head_since = Some(now);
        }
        let room = (self.max_head + 1).saturating_sub(self.head.len());
        let take = room.min(bytes.len());
        if self.head.is_empty()
            && let Some(end) = find_head_end(&bytes[..take])
        {
            // A whole head in one read (the usual case): looked at in place, not copied.
            self.head_since = None;
            self.finish_head(&bytes[..end])?;
            return Ok(&bytes[end..]);
        }
        // Take up to the end of the head only, so body bytes are not parsed as head.
        let old = self.head.len();
        self.head.extend_from_slice(&bytes[..take]);
        let from = self.scanned.saturating_sub(3);
        let end = find_head_end(&self.head[from..]).map(|e| from + e);
        let Some(end) = end else {
            self.scanned = self.head.len();
            if self.heads == 0 && self.head.starts_with(b"PRI * HTTP/2.0") {
                self.state = State::Passthrough;
            } else if self.head.len() > self.max_head {
                self.refuse(HeadError::TooLarge)?;
            }
            return Ok(&bytes[take..]);
        };
        let used = end.saturating_sub(old);
        let rest = &bytes[used..];
        let head = std::mem::take(&mut self.head);
        self.scanned = 0;
        self.head_since = None;
        self.finish_head(&head[..end])?;
        Ok(rest)
    }

    /// A complete head (terminator included) was read: its verdict, and what follows it.
    fn finish_head(&mut self, head: &[u8]) -> Result<(), StreamError> {
        if self.heads == 0 && head.starts_with(b"PRI * HTTP/2.0") {
            self.state = State::Passthrough;
            return Ok(());
        }
        self.heads += 1;
        match analyse(head, self.max_headers) {
            Ok(next) => {
                self.push(Ok(()))?;
                self.state = next;
            }
            Err(e) => self.refuse(e)?,
        }
        Ok(())
    }

    fn refuse(&mut self, e: HeadError) -> Result<(), StreamError> {
        self.push(Err(e))?;
        self.poisoned = Some(e);
        self.state = State::Passthrough;
        self.head = Vec::new();
        self.head_since = None;
        Ok(())
    }

    /// A body that cannot be followed: its request is refused if it has not been handed
    /// over yet (hyper's own decoder fails it otherwise), and so is every later one.
    fn bad_body(&mut self) {
        if let Some(last) = self.verdicts.back_mut() {
            *last = Err(HeadError::BadChunk);
        }
        self.poisoned = Some(HeadError::BadChunk);
        self.state = State::Passthrough;
    }

    fn push(&mut self, v: Result<(), HeadError>) -> Result<(), StreamError> {
        if self.verdicts.len() >= MAX_QUEUED {
            return Err(StreamError::TooDeep);
        }
        self.verdicts.push_back(v);
        Ok(())
    }

    /// Follows a chunked body; `None` when its framing is broken.
    fn feed_chunked<'a>(&mut self, mut c: Chunked, mut bytes: &'a [u8]) -> Option<&'a [u8]> {
        while !bytes.is_empty() {
            match c.next(bytes).ok()? {
                Next::Data(n) | Next::Framing(n) => bytes = &bytes[n..],
                Next::End(n) => {
                    self.state = State::Head;
                    return Some(&bytes[n..]);
                }
            }
        }
        self.state = State::Chunked(c);
        Some(bytes)
    }
}

/// Index just past the empty line ending a head (`\r\n\r\n`, or with bare LFs).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            // Skip leading empty lines, as httparse does.
            if buf[i + 1..].starts_with(b"\n") {
                return Some(i + 2);
            }
            if buf[i + 1..].starts_with(b"\r\n") {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Whether `head` has a CR not followed by LF or an LF not preceded by CR.
fn bare_line_end(head: &[u8]) -> bool {
    let mut after_crlf = 0;
    for i in memchr::memchr2_iter(b'\r', b'\n', head) {
        if i < after_crlf {
            continue; // the LF of a CRLF already seen
        }
        if head[i] == b'\n' || head.get(i + 1) != Some(&b'\n') {
            return true;
        }
        after_crlf = i + 2;
    }
    false
}

/// Checks one complete head and says how its body is framed.
fn analyse(head: &[u8], max_headers: usize) -> Result<State, HeadError> {
    // httparse accepts a bare LF as a line end; a front proxy may not split lines there.
    if bare_line_end(head) {
        return Err(HeadError::BareLineEnd);
    }
    // On the stack for the usual limits (the default is 100), left unwritten until parsed.
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut heap = Vec::new();
    let headers: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= stack.len() {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(HeadError::DuplicateLength);
            }
            length = Some(parse_length(h.value).ok_or(HeadError::BadLength)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !h.value.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::BadTransferEncoding);
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err(HeadError::LengthAndChunked);
    }
    if chunked && req.version != Some(1) {
        return Err(HeadError::BadTransferEncoding);
    }
    if req.method == Some("CONNECT") {
        return Ok(State::Passthrough);
    }
    Ok(match (chunked, length) {
        (true, _) => State::Chunked(Chunked::default()),
        (false, Some(n)) if n > 0 => State::Body(n),
        _ => State::Head,
    })
}

/// What a Connection header value says: its `close` and `keep-alive` tokens (`close` wins
/// over `keep-alive` wherever both appear), and whether it names other fields, which are then
/// hop-by-hop too.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionOptions {
    pub close: bool,
    pub keep_alive: bool,
    pub names_fields: bool,
}

pub fn connection_options(v: &[u8]) -> ConnectionOptions {
    let mut o = ConnectionOptions::default();
    // The one token nearly every peer sends, without splitting.
    if v.eq_ignore_ascii_case(b"keep-alive") {
        o.keep_alive = true;
        return o;
    }
    for token in v.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            o.close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            o.keep_alive = true;
        } else if !token.is_empty() {
            o.names_fields = true;
        }
    }
    o
}

/// `1*DIGIT`, nothing else (no sign, no spaces, no list), at most 18 digits.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // 18 digits cannot overflow a u64.
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn verdicts(input: &[u8]) -> (Vec<Result<(), HeadError>>, Result<(), StreamError>) {
        let mut t = Tracker::new(16384, 100);
        let r = t.feed(input, Instant::now());
        (t.verdicts.drain(..).collect(), r)
    }

    #[test]
    fn connection_says_close_keep_alive_and_which_fields_it_names() {
        let o = |v: &[u8]| {
            let c = connection_options(v);
            (c.close, c.keep_alive, c.names_fields)
        };
        assert_eq!(o(b"Keep-Alive"), (false, true, false));
        assert_eq!(o(b"close, keep-alive"), (true, true, false));
        assert_eq!(o(b"keep-alive, X-Secret"), (false, true, true));
        assert_eq!(o(b" , close ,"), (true, false, false));
    }

    #[test]
    fn deferred_heads_get_the_verdicts_a_parse_would_give() {
        let t0 = Instant::now();
        let mut t = Tracker::new(16384, 100);
        t.defer();
        assert!(t.is_deferred());
        // Empty lines start no head; a request line does, and its start is kept.
        t.feed(b"\r\n", t0).unwrap();
        assert_eq!(t.head_since(), None);
        t.feed(b"GET / HT", t0).unwrap();
        t.feed(b"TP/1.1\r\n\r\n", t0 + Duration::from_secs(1))
            .unwrap();
        assert_eq!(t.head_since(), Some(t0));
        t.own_head(b"\r\nGET / HTTP/1.1\r\n\r\n", None).unwrap();
        assert_eq!(t.head_since(), None);
        assert_eq!(t.next_verdict(), Some(Ok(())));
        // Limits as the tracker's own.
        assert!(t.within_limits(16384, 100));
        assert!(!t.within_limits(16385, 1) && !t.within_limits(10, 101));
        // A bare LF: refused, and so is everything after.
        t.own_head(b"GET / HTTP/1.1\nHost: a\r\n\r\n", Some(t0))
            .unwrap();
        assert_eq!(t.next_verdict(), Some(Err(HeadError::BareLineEnd)));
        assert_eq!(t.next_verdict(), Some(Err(HeadError::BareLineEnd)));
        // A later head, however clean, is refused as well, not queued as accepted.
        t.own_head(b"GET / HTTP/1.1\r\n\r\n", None).unwrap();
        assert_eq!(t.next_verdict(), Some(Err(HeadError::BareLineEnd)));
    }

    #[test]
    fn a_resumed_tracker_follows_bodies_from_the_unread_bytes() {
        let t0 = Instant::now();
        let mut t = Tracker::new(16384, 100);
        t.defer();
        t.own_head(b"GET / HTTP/1.1\r\n\r\n", None).unwrap();
        assert_eq!(t.next_verdict(), Some(Ok(())));
        t.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab", t0)
            .unwrap();
        t.resume(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab", t0)
            .unwrap();
        assert!(!t.is_deferred());
        assert_eq!(t.next_verdict(), Some(Ok(())));
        // The body's last byte, then a head with both framings.
        t.feed(
            b"cGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            t0,
        )
        .unwrap();
        assert_eq!(t.next_verdict(), Some(Err(HeadError::LengthAndChunked)));
    }

    #[test]
    fn follows_lengths_and_chunks_across_pipelined_requests() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n\
GET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(verdicts(input), (vec![Ok(()); 4], Ok(())));
        // The same bytes one at a time.
        let mut t = Tracker::new(16384, 100);
        for b in input {
            t.feed(std::slice::from_ref(b), Instant::now()).unwrap();
        }
        assert_eq!(t.verdicts.len(), 4);
        assert!(t.head_since().is_none());
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let cases: [(&[u8], HeadError); 9] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                HeadError::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
                HeadError::DuplicateLength,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n", HeadError::BadLength),
            (b"POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n", HeadError::BadLength),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HeadError::BadTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::BadTransferEncoding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::BadTransferEncoding,
            ),
            (b"GET / HTTP/1.1\nHost: a\n\n", HeadError::BareLineEnd),
        ];
        for (input, want) in cases {
            let (v, r) = verdicts(input);
            assert_eq!(v, vec![Err(want)], "{}", String::from_utf8_lossy(input));
            assert_eq!(r, Ok(()));
        }
        let mut t = Tracker::new(16384, 100);
        t.feed(cases[0].0, Instant::now()).unwrap();
        // Once refused, every later request on the connection is refused.
        assert_eq!(t.next_verdict(), Some(Err(HeadError::LengthAndChunked)));
        assert_eq!(t.next_verdict(), Some(Err(HeadError::LengthAndChunked)));
    }

    #[test]
    fn a_cr_or_lf_outside_a_crlf_is_a_bare_line_end() {
        // The plain definition, byte by byte, to check the scan against.
        let naive = |h: &[u8]| {
            h.iter().enumerate().any(|(i, &b)| {
                let prev = i.checked_sub(1).map(|p| h[p]);
                (b == b'\n' && prev != Some(b'\r')) || (b == b'\r' && h.get(i + 1) != Some(&b'\n'))
            })
        };
        let fixed: [&[u8]; 9] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\n",
            b"\r",
            b"a\r\r\n",
            b"a\r\n\n",
            b"\r\n\r",
            b"x\ny",
            b"",
            b"\r\n\r\n\r\n",
        ];
        for h in fixed {
            assert_eq!(bare_line_end(h), naive(h), "{h:?}");
        }
        for _ in 0..2000 {
            let h: Vec<u8> = (0..fastrand::usize(0..12))
                .map(|_| *fastrand::choice(b"\r\na").unwrap_or(&b'a'))
                .collect();
            assert_eq!(bare_line_end(&h), naive(&h), "{h:?}");
        }
    }

    #[test]
    fn bad_chunk_lines_end_the_stream() {
        for body in [
            &b"0x5\r\nhello\r\n0\r\n\r\n"[..],
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        ] {
            let input = [
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                body,
            ]
            .concat();
            assert_eq!(
                verdicts(&input),
                (vec![Err(HeadError::BadChunk)], Ok(())),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn h2c_and_connect_pass_through() {
        let mut t = Tracker::new(16384, 100);
        t.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Instant::now())
            .unwrap();
        assert!(t.is_passthrough());
        assert_eq!(t.next_verdict(), None);
        let mut t = Tracker::new(16384, 100);
        t.feed(
            b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01",
            Instant::now(),
        )
        .unwrap();
        assert_eq!(t.next_verdict(), Some(Ok(())));
        assert_eq!(t.next_verdict(), None);
    }

    #[test]
    fn oversized_heads_and_deep_pipelines_are_bounded() {
        let mut t = Tracker::new(8192, 100);
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        t.feed(&big, Instant::now()).unwrap();
        assert_eq!(t.next_verdict(), Some(Err(HeadError::TooLarge)));
        let mut t = Tracker::new(8192, 100);
        let many = b"GET / HTTP/1.1\r\n\r\n".repeat(MAX_QUEUED + 1);
        assert_eq!(t.feed(&many, Instant::now()), Err(StreamError::TooDeep));
    }
}
