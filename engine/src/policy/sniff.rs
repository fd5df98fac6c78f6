//! Names from a client's first bytes: the TLS SNI and the HTTP/1.x Host.
//!
//! Pure parsers over the bytes a client sent so far, called again as more arrive. Each
//! answers [`Sniff::NeedMore`] while the bytes are a prefix of something it could still
//! name, and then, once and for good, a [`Sniff::Name`] or [`Sniff::NoName`]: a decision
//! never changes when more bytes are appended, and no input of [`MAX_SNIFF_BYTES`] or
//! more is ever answered `NeedMore`, so a caller can size its buffer once.
//!
//! They never panic, never loop over more than the input, and read no byte past the
//! end of what they parse. Every length field is bounded by the one that contains it.
//!
//! * TLS ([`tls_sni`]): the first record must be a handshake record of at most 16 KiB
//!   that holds the whole ClientHello. A ClientHello fragmented over several records,
//!   a malformed or an oversized one yields `NoName` (the name rules then do not
//!   match): reassembling records would buy little (browsers send one record) and
//!   cost a buffer per connection. The name is the first `host_name` of the
//!   `server_name` extension; with Encrypted Client Hello that is the outer (public)
//!   name. The answer comes once the whole ClientHello is there, so a name always
//!   comes from a well-formed one.
//! * HTTP/1.x ([`http_host`]): the request line and the headers up to the empty line
//!   that ends them (`\r\n\r\n`, or bare `\n\n`), within 16 KiB. The name is the
//!   `Host` header (case-insensitive), or the authority of an absolute-form target
//!   (`GET http://a.example/ HTTP/1.1`, and `CONNECT a.example:443`), which RFC 9112
//!   §3.2.2 says wins over `Host`. Two `Host` headers, obsolete line folding, an IPv6
//!   literal or a request line that is not HTTP/1.x yield `NoName`.
//!
//! Names are normalised as the rules' names are ([`normalize_name`]): ASCII lowercase,
//! one trailing dot dropped, then checked as a DNS name (labels of 1 to 63 letters,
//! digits, `-` or `_`, at most 253 characters). A name that fails the check is
//! `NoName`: no rule could match it.

/// The largest TLS record a ClientHello may arrive in (TLSPlaintext, 2^14 bytes).
pub const MAX_TLS_RECORD: usize = 16 * 1024;

/// The largest HTTP/1.x header block looked at (request line and headers, with the
/// empty line that ends them).
pub const MAX_HTTP_HEADER: usize = 16 * 1024;

/// From this many bytes on, every sniffer has decided: a TLS record header and the
/// largest record.
pub const MAX_SNIFF_BYTES: usize = 5 + MAX_TLS_RECORD;

/// What a sniffer made of the bytes so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// A prefix of something that may still carry a name: call again with more.
    NeedMore,
    /// The name, normalised (see [`normalize_name`]).
    Name(String),
    /// Decided: there is no usable name (none present, malformed, not this protocol,
    /// fragmented or too large).
    NoName,
}

/// What [`sniff`] made of the bytes so far, saying which protocol the name came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// As [`Sniff::NeedMore`].
    NeedMore,
    /// A TLS ClientHello's server name.
    Sni(String),
    /// An HTTP/1.x request's host.
    Host(String),
    /// As [`Sniff::NoName`]; also for bytes that are neither TLS nor HTTP.
    NoName,
}

impl Sniffed {
    /// `(sni, host)`, as `Rules::decide_tcp_named` takes them.
    pub fn names(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Sniffed::Sni(n) => (Some(n), None),
            Sniffed::Host(n) => (None, Some(n)),
            Sniffed::NeedMore | Sniffed::NoName => (None, None),
        }
    }
}

/// Recognises TLS or HTTP by the first byte (22, a TLS handshake record, or an ASCII
/// letter, the start of an HTTP method) and runs that sniffer. Anything else is
/// `NoName` at once: SSH, SMTP clients that wait for the server, binary protocols.
pub fn sniff(buf: &[u8]) -> Sniffed {
    let (found, tls) = match buf.first() {
        None => return Sniffed::NeedMore,
        Some(22) => (tls_sni(buf), true),
        Some(b) if b.is_ascii_alphabetic() => (http_host(buf), false),
        Some(_) => return Sniffed::NoName,
    };
    match found {
        Sniff::NeedMore => Sniffed::NeedMore,
        Sniff::NoName => Sniffed::NoName,
        Sniff::Name(n) if tls => Sniffed::Sni(n),
        Sniff::Name(n) => Sniffed::Host(n),
    }
}

/// Why a parse stopped early: the bytes ran out (more may come), or they are wrong.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Short,
    Bad,
}

impl Stop {
    fn into_sniff(self) -> Sniff {
        match self {
            Stop::Short => Sniff::NeedMore,
            Stop::Bad => Sniff::NoName,
        }
    }
}

/// A cursor over the bytes that arrived, inside a length the protocol declared.
///
/// `limit` is where the enclosing length field says this part ends; `data` is what
/// arrived (never longer than the outermost limit). Reading past `limit` is `Bad`
/// (a length that does not fit its container); reading past `data` is `Short`.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    limit: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        let end = self.pos.checked_add(n).ok_or(Stop::Bad)?;
        if end > self.limit {
            return Err(Stop::Bad);
        }
        let s = self.data.get(self.pos..end).ok_or(Stop::Short)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<usize, Stop> {
        Ok(usize::from(self.bytes(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, Stop> {
        let b = self.bytes(2)?;
        Ok(usize::from(b[0]) << 8 | usize::from(b[1]))
    }

    /// A sub-reader over the next `n` bytes (a length-prefixed vector), which this
    /// reader skips. The bytes need not have arrived yet: the sub-reader says `Short`.
    fn take(&mut self, n: usize) -> Result<Reader<'a>, Stop> {
        let end = self.pos.checked_add(n).ok_or(Stop::Bad)?;
        if end > self.limit {
            return Err(Stop::Bad);
        }
        let sub = Reader {
            data: self.data,
            pos: self.pos,
            limit: end,
        };
        self.pos = end;
        Ok(sub)
    }

    fn at_end(&self) -> bool {
        self.pos == self.limit
    }
}

/// The server name of a TLS ClientHello (see the module docs for what is accepted).
pub fn tls_sni(buf: &[u8]) -> Sniff {
    match client_hello_sni(buf) {
        Ok(Some(name)) => Sniff::Name(name),
        Ok(None) => Sniff::NoName,
        Err(stop) => stop.into_sniff(),
    }
}

const EXT_SERVER_NAME: usize = 0;
const NAME_TYPE_HOST_NAME: usize = 0;

fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Stop> {
    // The record header (5 bytes) and the handshake header (4 bytes) are read with the
    // outermost limit, MAX_SNIFF_BYTES, so that a short buffer says `Short`.
    let mut r = Reader {
        data: buf,
        pos: 0,
        limit: MAX_SNIFF_BYTES,
    };
    // TLSPlaintext: type handshake(22), legacy_record_version 3.x, length.
    if r.u8()? != 22 {
        return Err(Stop::Bad);
    }
    if r.u8()? != 3 || r.u8()? > 4 {
        return Err(Stop::Bad);
    }
    let record_len = r.u16()?;
    if record_len == 0 || record_len > MAX_TLS_RECORD {
        return Err(Stop::Bad);
    }
    let mut record = r.take(record_len)?;
    // Handshake: msg_type client_hello(1), a 24-bit length. The whole message must fit
    // in this record: one that goes on in the next record is fragmented.
    if record.u8()? != 1 {
        return Err(Stop::Bad);
    }
    let hs = record.bytes(3)?;
    let hello_len = usize::from(hs[0]) << 16 | usize::from(hs[1]) << 8 | usize::from(hs[2]);
    // Nothing past the ClientHello is read: every read below is bounded by its end.
    let mut h = record.take(hello_len)?;

    // legacy_version 3.x, random, legacy_session_id <0..32>.
    if h.u8()? != 3 {
        return Err(Stop::Bad);
    }
    h.bytes(1 + 32)?;
    let sid = h.u8()?;
    if sid > 32 {
        return Err(Stop::Bad);
    }
    h.bytes(sid)?;
    // cipher_suites <2..2^16-2>, two bytes each; legacy_compression_methods <1..2^8-1>.
    let suites = h.u16()?;
    if suites < 2 || suites % 2 != 0 {
        return Err(Stop::Bad);
    }
    h.bytes(suites)?;
    let methods = h.u8()?;
    if methods == 0 {
        return Err(Stop::Bad);
    }
    h.bytes(methods)?;
    if h.at_end() {
        return Ok(None); // no extensions: an old client, no name
    }
    // extensions <8..2^16-1>: they fill the rest of the ClientHello exactly.
    let ext_len = h.u16()?;
    if h.pos + ext_len != h.limit {
        return Err(Stop::Bad);
    }
    let mut name = None;
    let mut seen_server_name = false;
    while !h.at_end() {
        let ty = h.u16()?;
        let len = h.u16()?;
        let mut ext = h.take(len)?;
        if ty == EXT_SERVER_NAME {
            if seen_server_name {
                return Err(Stop::Bad); // RFC 8446 4.2: no extension type twice
            }
            seen_server_name = true;
            name = server_name(&mut ext)?;
        } else {
            // Skipped, but the bytes must arrive: the answer waits for the whole hello.
            ext.bytes(len)?;
        }
    }
    Ok(name)
}

/// RFC 6066 §3: `ServerNameList <1..2^16-1>` of `{ name_type, HostName <1..2^16-1> }`.
/// The first `host_name` entry counts; an invalid one makes the whole answer `NoName`.
fn server_name(ext: &mut Reader<'_>) -> Result<Option<String>, Stop> {
    let list_len = ext.u16()?;
    if list_len == 0 || ext.pos + list_len != ext.limit {
        return Err(Stop::Bad);
    }
    let mut host = None;
    while !ext.at_end() {
        let ty = ext.u8()?;
        let len = ext.u16()?;
        if len == 0 {
            return Err(Stop::Bad);
        }
        let bytes = ext.bytes(len)?;
        if ty == NAME_TYPE_HOST_NAME && host.is_none() {
            let name = std::str::from_utf8(bytes).ok().and_then(normalize_name);
            host = Some(name.ok_or(Stop::Bad)?);
        }
    }
    Ok(host)
}

/// The host of an HTTP/1.x request (see the module docs for what is accepted).
pub fn http_host(buf: &[u8]) -> Sniff {
    match request_host(buf) {
        Ok(name) => Sniff::Name(name),
        // No end of the header block within the limit.
        Err(Stop::Short) if buf.len() >= MAX_HTTP_HEADER => Sniff::NoName,
        Err(stop) => stop.into_sniff(),
    }
}

/// Token characters (RFC 9110 §5.6.2): header names and methods.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Longest method looked at; real ones are short, and a long run of letters is not
/// HTTP.
const MAX_METHOD: usize = 32;

fn request_host(buf: &[u8]) -> Result<String, Stop> {
    let window = &buf[..buf.len().min(MAX_HTTP_HEADER)];
    let mut target = None;
    let mut host: Option<&[u8]> = None;
    let mut first = true;
    for raw in window.split_inclusive(|&b| b == b'\n') {
        let complete = raw.ends_with(b"\n");
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        // A CR is allowed only right before the LF (or as the last byte so far).
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.contains(&b'\r') {
            return Err(Stop::Bad);
        }
        if first {
            first = false;
            // Returns `Short` or `Bad` while the line has not ended.
            target = Some(request_line(line, complete)?);
            continue;
        }
        if !complete {
            header_prefix(line)?;
            break;
        }
        if line.is_empty() {
            return name_of(target, host);
        }
        let (name, value) = header(line)?;
        if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Err(Stop::Bad); // two Hosts: ambiguous, RFC 9112 says reject
            }
            host = Some(value);
        }
    }
    Err(Stop::Short)
}

/// How the request line names its target.
#[derive(Debug)]
enum Target<'a> {
    /// `/path` or `*`: the name is the Host header's.
    Origin,
    /// `http://authority/...` or CONNECT's `authority`: the name is this authority's.
    Authority(&'a [u8]),
}

/// Checks a request line, `METHOD SP target SP HTTP/1.d`, or as much of it as arrived
/// (then the answer is `Short` unless what arrived is already wrong).
fn request_line(line: &[u8], complete: bool) -> Result<Target<'_>, Stop> {
    let short = if complete { Stop::Bad } else { Stop::Short };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.len() > MAX_METHOD || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Stop::Bad);
    }
    let Some(target) = parts.next() else {
        return Err(short);
    };
    if method.is_empty() || !target.iter().all(|b| b.is_ascii_graphic()) {
        return Err(Stop::Bad);
    }
    let Some(version) = parts.next() else {
        return Err(short);
    };
    if target.is_empty() {
        return Err(Stop::Bad);
    }
    // "HTTP/1." and a digit; while the line goes on, a prefix of that.
    const HTTP1: &[u8] = b"HTTP/1.0";
    let fits = |(i, (&got, &want)): (usize, (&u8, &u8))| {
        if i == HTTP1.len() - 1 {
            got.is_ascii_digit()
        } else {
            got == want
        }
    };
    let prefix_ok = version.len() <= HTTP1.len() && version.iter().zip(HTTP1).enumerate().all(fits);
    if !prefix_ok || complete && version.len() != HTTP1.len() {
        return Err(Stop::Bad);
    }
    if !complete {
        return Err(Stop::Short);
    }
    if method == b"CONNECT" {
        return Ok(Target::Authority(target));
    }
    // Absolute form: scheme "://" authority [path]. The scheme is letters, digits and
    // + - . (RFC 3986 §3.1); anything with "://" after such a scheme counts.
    if let Some(i) = target.windows(3).position(|w| w == b"://") {
        let scheme = &target[..i];
        if !scheme.is_empty()
            && scheme[0].is_ascii_alphabetic()
            && scheme
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            let rest = &target[i + 3..];
            let end = rest
                .iter()
                .position(|&b| matches!(b, b'/' | b'?' | b'#'))
                .unwrap_or(rest.len());
            return Ok(Target::Authority(&rest[..end]));
        }
    }
    Ok(Target::Origin)
}

/// Checks a complete header line and splits it into name and value (OWS trimmed).
fn header(line: &[u8]) -> Result<(&[u8], &[u8]), Stop> {
    let colon = line.iter().position(|&b| b == b':').ok_or(Stop::Bad)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // No whitespace before the colon (RFC 9112 §5.1), no obsolete line folding (a line
    // that starts with whitespace continues the previous one; RFC 9112 §5.2).
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Stop::Bad);
    }
    if !value.iter().all(|&b| b == b'\t' || b >= 0x20 && b != 0x7f) {
        return Err(Stop::Bad);
    }
    Ok((name, value.trim_ascii()))
}

/// Checks the start of a header line that has not ended yet, so that garbage is
/// `NoName` without waiting for 16 KiB of it.
fn header_prefix(line: &[u8]) -> Result<(), Stop> {
    match line.iter().position(|&b| b == b':') {
        None if line.iter().all(|&b| is_tchar(b)) => Ok(()),
        None => Err(Stop::Bad),
        Some(_) => header(line).map(|_| ()),
    }
}

fn name_of(target: Option<Target<'_>>, host: Option<&[u8]>) -> Result<String, Stop> {
    let authority = match target {
        Some(Target::Authority(a)) => a,
        Some(Target::Origin) | None => host.ok_or(Stop::Bad)?,
    };
    // userinfo@ is deprecated in http URIs, but it must not be taken for the host.
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(i) => &authority[i + 1..],
        None => authority,
    };
    if authority.first() == Some(&b'[') {
        return Err(Stop::Bad); // an IPv6 literal: no name a rule could match
    }
    let host = match authority.iter().rposition(|&b| b == b':') {
        Some(i)
            if authority[i + 1..].len() <= 5
                && authority[i + 1..].iter().all(u8::is_ascii_digit) =>
        {
            &authority[..i]
        }
        Some(_) => return Err(Stop::Bad),
        None => authority,
    };
    std::str::from_utf8(host)
        .ok()
        .and_then(normalize_name)
        .ok_or(Stop::Bad)
}

/// A name's longest length, without the trailing dot (RFC 1035 §2.3.4, in text form).
pub const MAX_NAME: usize = 253;

/// Normalises a host name as rules and sniffers compare them: ASCII lowercase, one
/// trailing dot dropped; `None` if it is not a DNS name (see [`check_name`]).
pub fn normalize_name(name: &str) -> Option<String> {
    check_name(name).ok()
}

/// [`normalize_name`], saying what is wrong with a name that is not one: labels of 1
/// to 63 ASCII letters, digits, `-` or `_` (seen in real host names), joined by dots,
/// at most [`MAX_NAME`] characters. Non-ASCII names must be written in their
/// `xn--` (punycode) form, which is what SNI and Host carry.
pub fn check_name(name: &str) -> Result<String, String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("empty name".into());
    }
    if bare.len() > MAX_NAME {
        return Err(format!("name longer than {MAX_NAME} characters"));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters".into());
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(if c.is_ascii() {
                format!("character {c:?} is not allowed in a host name")
            } else {
                format!("non-ASCII character {c:?}: write the name in its xn-- (punycode) form")
            });
        }
    }
    Ok(bare.to_ascii_lowercase())
}

/// Shared with the rules' tests: the proptest settings and the mutator.
#[cfg(test)]
pub(crate) mod tests;
