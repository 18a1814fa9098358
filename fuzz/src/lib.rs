//! Fuzzing harness for the clusterphone wire decoder, shared by the cargo-fuzz
//! targets (`fuzz/fuzz_targets/*.rs`) and by the stable replay test
//! (`tests/fuzz_corpus.rs`, which includes this file with `#[path]`), so that
//! CI checks every committed input with exactly the logic the fuzzers run.
//!
//! Two entry points:
//!
//! - [`decoder_one`]: the input is a byte stream, fed whole to a
//!   `Decoder`, then frames are taken until `None` or an error; each payload
//!   is decoded as a `ciborium::Value`.
//! - [`receive_one`]: the input is a script (see [`ScriptBuilder`]) driving
//!   the whole sans-I/O receive path: bytes fed in arbitrary chunks (through
//!   `feed` or the socket-style `read_buf`/`filled`), real fds pushed, frames
//!   drained one by one or all at once, `clear`, end of stream.
//!
//! Oracles checked on every `next_frame` call:
//!
//! - a frame re-encodes (with `codec::encode_raw`) to exactly the bytes it was
//!   decoded from, and consumes exactly those bytes;
//! - `Ok(None)` is only returned when the buffered bytes are a valid prefix of
//!   a frame;
//! - every error is justified by the bytes (or missing fds) it blames;
//! - the decoder never holds more fds than its limit, and `read_buf` always
//!   offers room for the rest of a pending frame;
//! - the same stream fed whole gives the same frames (kinds, flags, seq,
//!   names, payloads, and which fd) as the scripted chunking, when the script
//!   saw no error; byte-level errors are found whatever the chunking;
//! - every fd the harness created is closed once the decoder is dropped
//!   (checked with `fcntl` after each run), and the process's open fd count
//!   does not grow across runs ([`periodic_fd_check`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use clusterphone::codec::{encode_raw, Decoder, Envelope, Kind, HEADER_LEN, MAGIC};
use clusterphone::ProtocolError;

/// Frame limit of the `decoder` target.
pub const DECODER_MAX_FRAME: usize = 1 << 20;
/// Fd limit of the `decoder` target (it pushes no fds).
pub const DECODER_MAX_FDS: usize = 4;
/// Frame limits the `receive` script can pick (index: low 3 bits of its first byte).
pub const MAX_FRAMES: [usize; 8] = [0, 20, 24, 64, 4096, 65536, 1 << 18, 1 << 20];
/// Cap on the bytes one script may feed (the repeat op amplifies): enough for
/// the decoder to give back a buffer above 1 MiB once drained.
pub const MAX_STREAM: usize = 1280 << 10;

/// `receive` script op: feed the next `n` bytes (`n` = next byte) with `feed`.
pub const OP_FEED: u8 = 0;
/// `receive` script op: push one fd.
pub const OP_PUSH_FD: u8 = 1;
/// `receive` script op: take frames until `None` or an error.
pub const OP_DRAIN: u8 = 2;
/// `receive` script op: copy the next `n` bytes (`n` = next byte) into `read_buf`, then `filled`.
pub const OP_READ: u8 = 3;
/// `receive` script op: feed the next `n` bytes (`n` = next byte) repeated `4 * k + 1` times (`k` = next byte).
pub const OP_FEED_REPEAT: u8 = 4;
/// `receive` script op: one `next_frame` call.
pub const OP_STEP: u8 = 5;
/// `receive` script op: `clear` (after checking the bytes fed since the last clear).
pub const OP_CLEAR: u8 = 6;
/// `receive` script op: end of stream (drain, check `is_mid_frame`, stop).
pub const OP_EOF: u8 = 7;
const OPS: u8 = 8;

/// An owned copy of a decoded frame, for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRec {
    /// Frame kind.
    pub kind: Kind,
    /// Flags byte.
    pub flags: u8,
    /// Sequence number.
    pub seq: u64,
    /// Namespace.
    pub ns: String,
    /// Command.
    pub cmd: String,
    /// CBOR payload bytes.
    pub payload: Vec<u8>,
    /// Which pushed fd came with the frame (its push index), if any.
    pub fd: Option<usize>,
}

/// What one `next_frame` call gave.
#[derive(Debug)]
pub enum Step {
    /// A frame.
    Frame(FrameRec),
    /// `Ok(None)`.
    NeedMore,
    /// A protocol error: the decoder must be dropped.
    Error(ProtocolError),
}

// ----- fds ------------------------------------------------------------------

/// Name of the memfd every harness fd is a dup of: `/proc/self/fd` shows it,
/// so leaks of harness fds can be told from fds libFuzzer opens (its
/// symbolizer pipes, its corpus files).
const FD_NAME: &str = "clusterphone-fuzz-fd";

fn template_fd() -> &'static OwnedFd {
    static TEMPLATE: OnceLock<OwnedFd> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let name = std::ffi::CString::new(FD_NAME).unwrap();
        // SAFETY: a valid C string; the returned fd (checked) is ours alone.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: just created, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    })
}

/// Makes real fds (dups of one memfd), remembers which push index
/// each carries, and checks at the end that every one of them was closed.
#[derive(Debug, Default)]
pub struct Fds {
    created: Vec<RawFd>,
    tags: HashMap<RawFd, usize>,
}

impl Fds {
    /// A new fd tagged `tag`.
    pub fn make(&mut self, tag: usize) -> OwnedFd {
        let fd = template_fd().try_clone().expect("dup the template fd");
        let raw = fd.as_raw_fd();
        self.created.push(raw);
        // fd numbers are unique among open fds, so a live fd's entry is always its own.
        self.tags.insert(raw, tag);
        fd
    }

    /// The tag of a live fd made here.
    pub fn tag_of(&self, fd: &OwnedFd) -> usize {
        *self.tags.get(&fd.as_raw_fd()).expect("the decoder returned an fd the harness never pushed")
    }

    /// Panics unless every fd made here is closed. Call once everything
    /// holding them (decoders, frames) is dropped.
    pub fn assert_all_closed(&self) {
        for &raw in &self.created {
            // SAFETY: F_GETFD only queries the descriptor table.
            let r = unsafe { libc::fcntl(raw, libc::F_GETFD) };
            assert!(r == -1, "fd {raw} is still open after the decoder was dropped: leaked");
        }
    }
}

/// Open fds of this process, and how many of them are harness fds (dups of
/// the template, which is always open once made).
pub fn open_fd_count() -> (usize, usize) {
    let (mut all, mut ours) = (0, 0);
    for e in std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten() {
        all += 1;
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(FD_NAME)) {
            ours += 1;
        }
    }
    (all, ours)
}

/// Every `every` calls, counts the process's open fds: aborts if any harness
/// fd other than the template is open between runs (a leak that slipped past
/// [`Fds`]), and reports (once) if the total grew since the first check —
/// without aborting, as libFuzzer itself opens fds lazily (e.g. two pipes to
/// its symbolizer the first time it prints a new function).
pub fn periodic_fd_check(every: u64) {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    static BASELINE: AtomicUsize = AtomicUsize::new(0);
    if CALLS.fetch_add(1, Ordering::Relaxed) % every.max(1) != 0 {
        return;
    }
    template_fd(); // opened once, lazily: count it from the start
    let (all, ours) = open_fd_count();
    if ours != 1 {
        eprintln!("fd leak: {ours} harness fds open between runs (only the template should be):");
        for e in std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten() {
            eprintln!("  {} -> {:?}", e.file_name().to_string_lossy(), std::fs::read_link(e.path()));
        }
        std::process::abort();
    }
    let base = BASELINE.load(Ordering::Relaxed);
    if base == 0 {
        BASELINE.store(all, Ordering::Relaxed);
    } else if all > base {
        eprintln!("note: {all} fds open, {base} at the first check (none of them the harness's)");
        BASELINE.store(all, Ordering::Relaxed);
    }
}

// ----- one next_frame call with oracles -------------------------------------

fn le_u16(b: &[u8]) -> usize {
    u16::from_le_bytes([b[0], b[1]]) as usize
}

fn total_len(rem: &[u8]) -> Option<usize> {
    (rem.len() >= 4).then(|| u32::from_le_bytes([rem[0], rem[1], rem[2], rem[3]]) as usize + 4)
}

fn kind_known(k: u8) -> bool {
    (1..=6).contains(&k)
}

/// Checks that `rem` (every byte buffered, from the start of the pending frame)
/// is a valid prefix of a frame, as `Ok(None)` claims.
fn assert_valid_prefix(rem: &[u8], max_frame: usize) {
    let Some(total) = total_len(rem) else { return };
    assert!(total <= max_frame, "Ok(None) for an announced frame of {total} bytes above the limit {max_frame}");
    assert!(total >= HEADER_LEN, "Ok(None) for a length field ({total}) that cannot hold a header");
    assert!(rem.len() < total, "Ok(None) with a whole frame ({total} bytes) buffered ({})", rem.len());
    if rem.len() > 4 {
        assert_eq!(rem[4], MAGIC, "Ok(None) with a bad magic byte buffered");
    }
    if rem.len() >= HEADER_LEN {
        assert!(kind_known(rem[5]), "Ok(None) with an unknown kind {} buffered", rem[5]);
        assert!(rem[7] <= 1, "Ok(None) with nfds {} buffered", rem[7]);
        assert!(
            HEADER_LEN + le_u16(&rem[16..]) + le_u16(&rem[18..]) <= total,
            "Ok(None) with names longer than the frame"
        );
    }
}

/// Checks that `err` is justified by `rem` (every byte buffered, from the
/// start of the frame that failed) and the fds that were waiting.
fn assert_error_justified(err: &ProtocolError, rem: &[u8], max_frame: usize, fds_waiting: usize) {
    if rem.len() > 4 && !matches!(err, ProtocolError::BadMagic(_)) {
        assert_eq!(rem[4], MAGIC, "{err:?} reported for a frame with a bad magic byte");
    }
    let total = total_len(rem);
    let whole = |what: &str| {
        let t = total.unwrap_or_else(|| panic!("{what} with less than a length field buffered"));
        assert!(rem.len() >= t, "{what} before the whole frame ({t} bytes) arrived ({})", rem.len());
        assert!(t >= HEADER_LEN && t <= max_frame);
        t
    };
    match *err {
        ProtocolError::BadMagic(b) => {
            assert!(rem.len() > 4, "BadMagic with {} bytes buffered", rem.len());
            assert_eq!(rem[4], b, "BadMagic blames the wrong byte");
            assert_ne!(b, MAGIC, "BadMagic for the right magic byte");
        }
        ProtocolError::TooLarge { size, max } => {
            assert_eq!(max, max_frame, "TooLarge reports the wrong limit");
            assert_eq!(Some(size), total, "TooLarge reports the wrong size");
            assert!(size > max, "TooLarge for a frame within the limit");
        }
        ProtocolError::BadLength(l) => {
            let t = total.expect("BadLength with less than a length field buffered");
            assert_eq!(l as usize + 4, t, "BadLength reports the wrong length");
            assert!(t <= max_frame, "BadLength instead of TooLarge");
            let names_overflow = rem.len() >= HEADER_LEN && HEADER_LEN + le_u16(&rem[16..]) + le_u16(&rem[18..]) > t;
            assert!(t < HEADER_LEN || names_overflow, "BadLength for a consistent length");
        }
        ProtocolError::UnknownKind(k) => {
            assert!(rem.len() >= HEADER_LEN, "UnknownKind before the header arrived");
            assert_eq!(rem[5], k, "UnknownKind blames the wrong byte");
            assert!(!kind_known(k), "UnknownKind for a known kind");
        }
        ProtocolError::TooManyFds(n) => {
            assert!(rem.len() >= HEADER_LEN, "TooManyFds before the header arrived");
            assert_eq!(rem[7], n, "TooManyFds blames the wrong byte");
            assert!(n > 1, "TooManyFds for nfds {n}");
        }
        ProtocolError::MissingFds => {
            whole("MissingFds");
            assert_eq!(rem[7], 1, "MissingFds for a frame that announces no fd");
            assert_eq!(fds_waiting, 0, "MissingFds with an fd waiting");
        }
        ProtocolError::BadName => {
            let t = whole("BadName");
            let (ns, cmd) = (le_u16(&rem[16..]), le_u16(&rem[18..]));
            assert!(HEADER_LEN + ns + cmd <= t);
            let body = &rem[HEADER_LEN..t];
            let ok = std::str::from_utf8(&body[..ns]).is_ok() && std::str::from_utf8(&body[ns..ns + cmd]).is_ok();
            assert!(!ok, "BadName for UTF-8 names");
        }
        ref other => panic!("next_frame returned an error it never should: {other:?}"),
    }
}

/// One `next_frame` call on `dec`, whose input so far (since it was made or
/// cleared) is `stream`, checked against the bytes.
pub fn step(dec: &mut Decoder, stream: &[u8], max_frame: usize, fds: &Fds) -> Step {
    let buffered = dec.buffered();
    assert!(buffered <= stream.len(), "decoder holds {buffered} bytes, only {} were fed", stream.len());
    let rem = &stream[stream.len() - buffered..];
    let waiting = dec.waiting_fds();
    let r = match dec.next_frame() {
        Ok(Some(f)) => Ok(Some(FrameRec {
            kind: f.kind,
            flags: f.flags,
            seq: f.seq,
            ns: f.ns.to_owned(),
            cmd: f.cmd.to_owned(),
            payload: f.payload.to_vec(),
            fd: f.fd.as_ref().map(|fd| fds.tag_of(fd)),
        })),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match r {
        Ok(Some(rec)) => {
            let env = Envelope {
                kind: rec.kind,
                flags: rec.flags,
                nfds: rec.fd.is_some() as u8,
                seq: rec.seq,
                ns: &rec.ns,
                cmd: &rec.cmd,
            };
            let mut again = Vec::new();
            encode_raw(&mut again, env, &rec.payload).expect("re-encode a decoded frame");
            assert!(again.len() <= max_frame, "decoded a frame of {} bytes above the limit {max_frame}", again.len());
            assert!(
                again.len() <= rem.len() && rem[..again.len()] == again[..],
                "frame does not re-encode to its bytes"
            );
            assert_eq!(dec.buffered(), buffered - again.len(), "frame consumed the wrong number of bytes");
            assert_eq!(dec.waiting_fds(), waiting - rec.fd.is_some() as usize, "frame took the wrong number of fds");
            Step::Frame(rec)
        }
        Ok(None) => {
            assert_valid_prefix(rem, max_frame);
            assert_eq!(dec.waiting_fds(), waiting, "Ok(None) took an fd");
            Step::NeedMore
        }
        Err(e) => {
            assert_error_justified(&e, rem, max_frame, waiting);
            Step::Error(e)
        }
    }
}

// ----- decoder target -------------------------------------------------------

/// The `decoder` target: `data` fed whole, frames taken until `None` or an
/// error, payloads decoded as CBOR values. Returns the frames.
pub fn decoder_one(data: &[u8]) -> (Vec<FrameRec>, Option<ProtocolError>) {
    let fds = Fds::default();
    let mut dec = Decoder::new(DECODER_MAX_FRAME, DECODER_MAX_FDS);
    dec.feed(data);
    assert_eq!(dec.buffered(), data.len(), "feed lost bytes");
    let mut frames = Vec::new();
    let err = loop {
        match step(&mut dec, data, DECODER_MAX_FRAME, &fds) {
            Step::Frame(rec) => {
                let _ = ciborium::from_reader::<ciborium::Value, _>(&rec.payload[..]);
                frames.push(rec);
            }
            Step::NeedMore => {
                assert_eq!(dec.is_mid_frame(), dec.buffered() > 0);
                break None;
            }
            Step::Error(e) => break Some(e),
        }
    };
    (frames, err)
}

// ----- receive target -------------------------------------------------------

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
}

/// Bytes and fds given to the decoder since it was made or last cleared.
#[derive(Default)]
struct Segment {
    stream: Vec<u8>,
    fds_pushed: usize,
    frames: Vec<FrameRec>,
    /// The last `next_frame` said `None` and nothing was added since.
    drained: bool,
}

/// What a `receive` run saw, for tests.
#[derive(Debug, Default)]
pub struct ReceiveOutcome {
    /// Frames taken, over all segments.
    pub frames: usize,
    /// The error that ended the run, if any (`TooManyFdsInFlight` for a refused fd,
    /// `Truncated` for an end of stream inside a frame).
    pub error: Option<ProtocolError>,
}

fn is_fd_error(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::MissingFds | ProtocolError::TooManyFdsInFlight)
}

fn consumed(frames: &[FrameRec]) -> usize {
    frames.iter().map(|f| HEADER_LEN + f.ns.len() + f.cmd.len() + f.payload.len()).sum()
}

/// Feeds the segment whole to a fresh decoder that has every fd up front and
/// compares with what the script's chunking gave.
fn check_against_whole(seg: &Segment, max_frame: usize, fds: &mut Fds, chunked_err: Option<&ProtocolError>) {
    if chunked_err.is_some_and(is_fd_error) {
        return; // depends on when the fds arrived, not on the bytes
    }
    let mut dec = Decoder::new(max_frame, usize::MAX);
    for i in 0..seg.fds_pushed {
        dec.push_fd(fds.make(i)).expect("push_fd with no limit");
    }
    dec.feed(&seg.stream);
    let mut frames = Vec::new();
    let err = loop {
        match step(&mut dec, &seg.stream, max_frame, fds) {
            Step::Frame(rec) => frames.push(rec),
            Step::NeedMore => break None,
            Step::Error(e) => break Some(e),
        }
    };
    match chunked_err {
        Some(e) => assert!(err.is_some(), "the chunked stream failed with {e:?}, the whole one decoded"),
        None => {
            assert!(frames.len() >= seg.frames.len(), "the whole stream gave fewer frames ({err:?})");
            assert_eq!(frames[..seg.frames.len()], seg.frames[..], "chunked and whole streams disagree");
            // Frames the script never asked for may fail (e.g. for want of an fd).
            if seg.drained {
                assert!(err.is_none(), "the whole stream failed with {err:?}, the chunked one did not");
                assert_eq!(frames.len(), seg.frames.len(), "the whole stream gave more frames");
                assert_eq!(
                    dec.buffered(),
                    seg.stream.len() - consumed(&seg.frames),
                    "the whole stream left other bytes"
                );
            }
        }
    }
}

/// The `receive` target: runs the script in `data` (see [`ScriptBuilder`]).
pub fn receive_one(data: &[u8]) -> ReceiveOutcome {
    let mut fds = Fds::default();
    let outcome = run_script(data, &mut fds);
    fds.assert_all_closed();
    outcome
}

fn run_script(data: &[u8], fds: &mut Fds) -> ReceiveOutcome {
    let mut r = Reader { data };
    let Some(cfg) = r.byte() else { return ReceiveOutcome::default() };
    let max_frame = MAX_FRAMES[(cfg & 7) as usize];
    let max_fds = ((cfg >> 3) & 3) as usize;
    let mut dec = Decoder::new(max_frame, max_fds);
    let mut seg = Segment { drained: true, ..Segment::default() };
    let mut total_fed = 0usize;
    let mut out = ReceiveOutcome::default();
    let mut eof = false;

    // One next_frame; false once the run must stop.
    let take = |dec: &mut Decoder, seg: &mut Segment, fds: &Fds, out: &mut ReceiveOutcome| -> Option<bool> {
        match step(dec, &seg.stream, max_frame, fds) {
            Step::Frame(rec) => {
                seg.frames.push(rec);
                out.frames += 1;
                Some(true)
            }
            Step::NeedMore => {
                seg.drained = true;
                Some(false)
            }
            Step::Error(e) => {
                out.error = Some(e);
                None
            }
        }
    };

    while out.error.is_none() && !eof {
        let Some(op) = r.byte() else { break };
        match op % OPS {
            OP_FEED | OP_FEED_REPEAT | OP_READ => {
                let n = r.byte().unwrap_or(0) as usize;
                let reps = if op % OPS == OP_FEED_REPEAT { r.byte().unwrap_or(0) as usize * 4 + 1 } else { 1 };
                let piece = r.take(n);
                let len = (piece.len() * reps).min(MAX_STREAM.saturating_sub(total_fed));
                let bytes: Vec<u8> = piece.iter().copied().cycle().take(len).collect();
                if op % OPS == OP_READ {
                    // Socket style, as Conn::read does.
                    let pending = dec.buffered();
                    let buf = dec.read_buf();
                    assert!(!buf.is_empty(), "read_buf gave no room: a recv would look like end of stream");
                    let room = buf.len();
                    let k = room.min(bytes.len());
                    buf[..k].copy_from_slice(&bytes[..k]);
                    dec.filled(k);
                    if let Some(t) = total_len(&seg.stream[seg.stream.len() - pending..]) {
                        if t <= max_frame && t > pending {
                            assert!(room >= t - pending, "read_buf has no room for the rest of a pending frame");
                        }
                    }
                    seg.stream.extend_from_slice(&bytes[..k]);
                    total_fed += k;
                } else {
                    dec.feed(&bytes);
                    seg.stream.extend_from_slice(&bytes);
                    total_fed += bytes.len();
                }
                if !bytes.is_empty() {
                    seg.drained = false;
                }
            }
            OP_PUSH_FD => {
                let before = dec.waiting_fds();
                match dec.push_fd(fds.make(seg.fds_pushed)) {
                    Ok(()) => {
                        seg.fds_pushed += 1;
                        assert_eq!(dec.waiting_fds(), before + 1);
                    }
                    Err(e) => {
                        assert_eq!(e, ProtocolError::TooManyFdsInFlight);
                        assert_eq!(before, max_fds, "push_fd refused an fd below the limit");
                        assert_eq!(dec.waiting_fds(), before);
                        out.error = Some(e);
                    }
                }
            }
            OP_DRAIN => while let Some(true) = take(&mut dec, &mut seg, fds, &mut out) {},
            OP_STEP => {
                take(&mut dec, &mut seg, fds, &mut out);
            }
            OP_CLEAR => {
                check_against_whole(&seg, max_frame, fds, None);
                dec.clear();
                assert_eq!((dec.buffered(), dec.waiting_fds(), dec.is_mid_frame()), (0, 0, false));
                seg = Segment { drained: true, ..Segment::default() };
            }
            OP_EOF => {
                while let Some(true) = take(&mut dec, &mut seg, fds, &mut out) {}
                if out.error.is_none() && dec.is_mid_frame() {
                    out.error = Some(ProtocolError::Truncated);
                }
                eof = true;
            }
            _ => unreachable!(),
        }
        assert!(dec.waiting_fds() <= max_fds, "decoder holds {} fds, limit {max_fds}", dec.waiting_fds());
        assert!(dec.buffered() <= seg.stream.len());
        assert_eq!(dec.is_mid_frame(), dec.buffered() > 0);
    }
    if out.error.is_none() && !eof {
        while let Some(true) = take(&mut dec, &mut seg, fds, &mut out) {}
    }
    let chunked_err = match &out.error {
        Some(ProtocolError::Truncated) => None, // the bytes themselves were fine
        other => other.as_ref(),
    };
    drop(dec);
    check_against_whole(&seg, max_frame, fds, chunked_err);
    out
}

/// Writes `receive` scripts (for seeds and tests).
#[derive(Debug, Clone)]
pub struct ScriptBuilder {
    bytes: Vec<u8>,
}

impl ScriptBuilder {
    /// A script for a decoder limited to `MAX_FRAMES[max_frame_index]` bytes
    /// per frame and `max_fds` (0 to 3) waiting fds.
    pub fn new(max_frame_index: u8, max_fds: u8) -> ScriptBuilder {
        assert!(max_frame_index < 8 && max_fds < 4);
        ScriptBuilder { bytes: vec![max_frame_index | max_fds << 3] }
    }

    /// Feeds `data` with `feed`, in pieces of at most `chunk` (≤ 255) bytes.
    pub fn feed(&mut self, data: &[u8], chunk: usize) -> &mut Self {
        self.pieces(OP_FEED, data, chunk)
    }

    /// Feeds `data` through `read_buf`/`filled`, in pieces of at most `chunk` bytes.
    pub fn read(&mut self, data: &[u8], chunk: usize) -> &mut Self {
        self.pieces(OP_READ, data, chunk)
    }

    fn pieces(&mut self, op: u8, data: &[u8], chunk: usize) -> &mut Self {
        for piece in data.chunks(chunk.clamp(1, 255)) {
            self.bytes.extend_from_slice(&[op, piece.len() as u8]);
            self.bytes.extend_from_slice(piece);
        }
        self
    }

    /// Feeds `piece` (≤ 255 bytes) `4 * k + 1` times in one `feed` call.
    pub fn feed_repeat(&mut self, piece: &[u8], k: u8) -> &mut Self {
        assert!(piece.len() <= 255);
        self.bytes.extend_from_slice(&[OP_FEED_REPEAT, piece.len() as u8, k]);
        self.bytes.extend_from_slice(piece);
        self
    }

    /// Pushes one fd.
    pub fn push_fd(&mut self) -> &mut Self {
        self.op(OP_PUSH_FD)
    }

    /// Takes frames until `None`.
    pub fn drain(&mut self) -> &mut Self {
        self.op(OP_DRAIN)
    }

    /// Takes one frame.
    pub fn step(&mut self) -> &mut Self {
        self.op(OP_STEP)
    }

    /// Clears the decoder.
    pub fn clear(&mut self) -> &mut Self {
        self.op(OP_CLEAR)
    }

    /// Ends the stream.
    pub fn eof(&mut self) -> &mut Self {
        self.op(OP_EOF)
    }

    fn op(&mut self, op: u8) -> &mut Self {
        self.bytes.push(op);
        self
    }

    /// The script's bytes.
    pub fn build(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}
