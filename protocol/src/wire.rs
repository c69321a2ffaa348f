//! The wire format every Tessera message uses: one version byte, then the message's
//! postcard encoding. On a stream each message is a frame: a 4-byte big-endian length, then
//! that many bytes. Every read has a size limit checked before anything is allocated, and
//! every failure is an error value: garbage from a peer never panics or grows a buffer.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The wire protocol version this build speaks (first byte of every encoded message).
pub const PROTOCOL_VERSION: u16 = 3;

/// Why bytes could not be turned into a message, or a message into bytes.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Longer than the limit for this kind of message.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared or actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Empty, where a version byte and a body were expected.
    #[error("empty message")]
    Empty,
    /// From a protocol version this build does not speak.
    #[error("message is protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    Version(u8),
    /// The body is not a valid encoding of the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// The transport failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` with the version byte, refusing more than `max` bytes.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let out = postcard::to_extend(msg, vec![PROTOCOL_VERSION as u8])
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if out.len() > max {
        return Err(WireError::TooLarge {
            len: out.len(),
            max,
        });
    }
    Ok(out)
}

/// Decodes what [`encode`] wrote. Trailing bytes are refused: one message, one encoding.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if u16::from(version) != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Writes `msg` as one frame and flushes, so it leaves now rather than with the next one.
pub async fn write_frame<W, T>(w: &mut W, msg: &T, max: usize) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = encode(msg, max)?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge {
        len: body.len(),
        max,
    })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

/// Bytes read at a time inside a frame.
const READ_CHUNK: usize = 16 * 1024;

/// Reads one frame of at most `max` bytes. `Ok(None)` is a clean end of stream between
/// frames; an end inside a frame is [`WireError::Truncated`].
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<Option<T>, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::Truncated {
                got,
                want: header.len(),
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    // Grow with the bytes that actually arrive: a peer announcing a large frame and then
    // stalling holds at most one chunk of memory, not the announced size.
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    let mut chunk = [0u8; READ_CHUNK];
    while body.len() < len {
        let want = (len - body.len()).min(READ_CHUNK);
        let n = r.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(WireError::Truncated {
                got: body.len(),
                want: len,
            });
        }
        body.extend_from_slice(&chunk[..n]);
    }
    decode(&body, max).map(Some)
}

/// Reads frames like [`read_frame`], but keeps a partly received frame between calls, so
/// a pending [`FrameReader::next`] can be dropped (a `select!` branch losing) without
/// losing bytes: the next call picks up where it stopped.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames of at most `max` bytes from `inner`.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            max,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream. Cancel-safe.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        loop {
            if let Some(header) = self.buf.first_chunk::<4>() {
                let len = u32::from_be_bytes(*header) as usize;
                if len > self.max {
                    return Err(WireError::TooLarge { len, max: self.max });
                }
                if self.buf.len() >= 4 + len {
                    let frame: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                    return decode(&frame, self.max).map(Some);
                }
            }
            // Memory grows only with bytes that arrive, one chunk at a time. `read` is
            // cancel-safe, and its bytes are kept before this future can be dropped again.
            let mut chunk = [0u8; READ_CHUNK];
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    got if got < 4 => Err(WireError::Truncated { got, want: 4 }),
                    got => Err(WireError::Truncated {
                        got: got - 4,
                        want: self
                            .buf
                            .first_chunk::<4>()
                            .map_or(0, |h| u32::from_be_bytes(*h) as usize),
                    }),
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[test]
    fn frame_reader_reads_what_read_frame_reads_and_survives_cancellation() {
        futures::executor::block_on(async {
            let mut bytes = Vec::new();
            for s in ["one", "two", &"x".repeat(40_000)] {
                write_frame(&mut bytes, &s.to_owned(), 64 * 1024)
                    .await
                    .expect("write");
            }
            // A reader that yields one byte per poll, and Pending in between: every `next`
            // future below is dropped many times mid-frame.
            struct Trickle(Vec<u8>, usize, bool);
            impl AsyncRead for Trickle {
                fn poll_read(
                    mut self: std::pin::Pin<&mut Self>,
                    cx: &mut std::task::Context<'_>,
                    out: &mut [u8],
                ) -> std::task::Poll<std::io::Result<usize>> {
                    self.2 = !self.2;
                    if self.2 {
                        cx.waker().wake_by_ref();
                        return std::task::Poll::Pending;
                    }
                    if self.1 >= self.0.len() || out.is_empty() {
                        return std::task::Poll::Ready(Ok(0));
                    }
                    out[0] = self.0[self.1];
                    self.1 += 1;
                    std::task::Poll::Ready(Ok(1))
                }
            }
            let mut r = FrameReader::new(Trickle(bytes, 0, false), 64 * 1024);
            let mut got = Vec::new();
            loop {
                // Poll once; on Pending drop the future and start a new one.
                let next = {
                    let fut = r.next::<String>();
                    futures::pin_mut!(fut);
                    futures::poll!(fut)
                };
                match next {
                    std::task::Poll::Pending => continue,
                    std::task::Poll::Ready(Ok(Some(s))) => got.push(s),
                    std::task::Poll::Ready(Ok(None)) => break,
                    std::task::Poll::Ready(Err(e)) => panic!("{e}"),
                }
            }
            assert_eq!(got.len(), 3);
            assert_eq!((got[0].as_str(), got[1].as_str()), ("one", "two"));
            assert_eq!(got[2].len(), 40_000);
            let mut short = FrameReader::new(Cursor::new(vec![0, 0, 0, 9, 1]), 64);
            assert!(matches!(
                short.next::<String>().await,
                Err(WireError::Truncated { got: 1, want: 9 })
            ));
        });
    }
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Msg {
        id: u64,
        text: String,
        list: Vec<u32>,
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let a = Msg {
            id: 1,
            text: "héllo".into(),
            list: vec![1, 2, 3],
        };
        let b = Msg {
            id: 2,
            text: String::new(),
            list: vec![],
        };
        let mut buf = Vec::new();
        block_on(write_frame(&mut buf, &a, 1024)).expect("write");
        block_on(write_frame(&mut buf, &b, 1024)).expect("write");
        let mut r = Cursor::new(buf);
        assert_eq!(
            block_on(read_frame::<_, Msg>(&mut r, 1024)).expect("a"),
            Some(a)
        );
        assert_eq!(
            block_on(read_frame::<_, Msg>(&mut r, 1024)).expect("b"),
            Some(b)
        );
        assert_eq!(
            block_on(read_frame::<_, Msg>(&mut r, 1024)).expect("eof"),
            None
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        // Announces 4 GiB; must fail on the header alone.
        let mut r = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        match block_on(read_frame::<_, Msg>(&mut r, 1024)) {
            Err(WireError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as usize, 1024))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let big = Msg {
            id: 1,
            text: "x".repeat(2000),
            list: vec![],
        };
        let mut buf = Vec::new();
        assert!(matches!(
            block_on(write_frame(&mut buf, &big, 1024)),
            Err(WireError::TooLarge { .. })
        ));
        assert!(buf.is_empty(), "nothing is written for a refused frame");
    }

    #[test]
    fn truncated_wrong_version_and_trailing_bytes_are_errors() {
        let mut r = Cursor::new(vec![0, 0]);
        assert!(matches!(
            block_on(read_frame::<_, Msg>(&mut r, 1024)),
            Err(WireError::Truncated { got: 2, want: 4 })
        ));
        let mut r = Cursor::new(vec![0, 0, 0, 9, 1, 1]);
        assert!(matches!(
            block_on(read_frame::<_, Msg>(&mut r, 1024)),
            Err(WireError::Truncated { got: 2, want: 9 })
        ));
        let mut r = Cursor::new(vec![0, 0, 0, 0]);
        assert!(matches!(
            block_on(read_frame::<_, Msg>(&mut r, 1024)),
            Err(WireError::Empty)
        ));

        let good = encode(
            &Msg {
                id: 5,
                text: "a".into(),
                list: vec![],
            },
            1024,
        )
        .expect("encode");
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        assert!(matches!(
            decode::<Msg>(&wrong_version, 1024),
            Err(WireError::Version(9))
        ));
        let mut trailing = good;
        trailing.push(0);
        assert!(matches!(
            decode::<Msg>(&trailing, 1024),
            Err(WireError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = Cursor::new(bytes.clone());
            let _ = block_on(read_frame::<_, Msg>(&mut r, 256));
            let _ = decode::<Msg>(&bytes, 256);
        }

        #[test]
        fn any_message_round_trips(id in any::<u64>(), text in ".{0,64}", list in proptest::collection::vec(any::<u32>(), 0..32)) {
            let m = Msg { id, text, list };
            let bytes = encode(&m, 4096).expect("encode");
            prop_assert_eq!(decode::<Msg>(&bytes, 4096).expect("decode"), m);
        }
    }
}
