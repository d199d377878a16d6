//! The bytes of the messages that cross a process boundary (ractor_cluster carries them inside
//! its own frames): a magic tag, a layout version, the payload's kind, and its bincode 2
//! encoding, decoded with a size limit. ractor_cluster's conversions cannot fail, so a frame that
//! is not ours, of another version or kind, too large, or undecodable becomes a `Rejected` value
//! with the reason, which the receiving actor logs and answers.

use ractor::BytesConvertable;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use fedbpt::protocol::{ClientUpdate, SearchDistribution};

use crate::profile::{from_wall_clock, now_ms, to_wall_clock, Stamp};

/// First bytes of every fedbpt payload.
pub const MAGIC: &[u8; 4] = b"FBPT";
/// Version of the payloads' layout; a peer with another refuses them.
pub const WIRE_VERSION: u16 = 1;
/// Largest payload decoded, a bound of its own beside ractor_cluster's frame limit
/// (`cluster.max_frame_bytes`, 16 MiB by default, which applies first): a search distribution
/// of d = 1,000 with its packed f32 covariance is about 2 MB.
pub const MAX_PAYLOAD: usize = 64 << 20;
const HEADER: usize = 7;

/// What a payload is, written after the version so that a valid payload of one message is
/// never taken for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Train = 1,
    TrainReply = 2,
    Join = 3,
    JoinReply = 4,
    ReplayTrain = 5,
    ReplayReply = 6,
}

impl Kind {
    fn name(byte: u8) -> String {
        match byte {
            1 => "Train".into(),
            2 => "TrainReply".into(),
            3 => "Join".into(),
            4 => "JoinReply".into(),
            5 => "ReplayTrain".into(),
            6 => "ReplayReply".into(),
            b => format!("unknown kind {b}"),
        }
    }
}

/// Encodes `value` with the header.
pub fn encode<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    out.push(kind as u8);
    // Encoding these plain data types into a Vec cannot fail; were it to, the empty body fails
    // to decode on the other side, with a reason.
    if let Ok(body) = bincode::serde::encode_to_vec(value, bincode::config::standard()) {
        out.extend(body);
    }
    out
}

/// Decodes what [`encode`] wrote, checking the header, the kind, the size and that every byte
/// is used.
pub fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > MAX_PAYLOAD + HEADER {
        return Err(format!("payload of {} bytes exceeds the limit of {MAX_PAYLOAD}", bytes.len()));
    }
    let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Err("not a fedbpt payload (bad magic)".into());
    };
    let [v0, v1, k, body @ ..] = rest else {
        return Err("payload ends inside its header".into());
    };
    let version = u16::from_le_bytes([*v0, *v1]);
    if version != WIRE_VERSION {
        return Err(format!("payload version {version}, this fedbpt speaks {WIRE_VERSION}"));
    }
    if *k != kind as u8 {
        return Err(format!("a {} payload where a {:?} belongs", Kind::name(*k), kind));
    }
    let config = bincode::config::standard().with_limit::<MAX_PAYLOAD>();
    let (value, used) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| format!("{kind:?} payload does not decode: {e}"))?;
    if used != body.len() {
        return Err(format!("{} bytes left over after the {kind:?} payload", body.len() - used));
    }
    Ok(value)
}

/// A fault the server injects into one client's round (fault-injection experiments).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ClientFault {
    /// The client kills itself halfway through its local search.
    DieMidSearch,
    /// A panic inside the handler.
    Panic,
    /// The work is done but the reply is dropped.
    DropReply,
    /// The reply is held back this long (a straggler).
    Delay(std::time::Duration),
    /// `traffic = "replay"`: the replica is moved off the server's state before it applies
    /// the round's digests (`faults.corrupt_replica`).
    CorruptReplica,
}

/// One round's request to a client. In a process the deadline is absolute (the server's
/// clock); on the wire it travels as the time left, so that hosts need not share a clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Train {
    pub dist: SearchDistribution,
    pub fault: Option<ClientFault>,
    /// The round's deadline, milliseconds since the Unix epoch on this host.
    pub deadline_ms: u64,
    pub stamp: Stamp,
}

#[derive(Serialize, Deserialize)]
struct TrainOnWire {
    dist: SearchDistribution,
    fault: Option<ClientFault>,
    left_ms: u64,
    stamp: Stamp,
}

/// A request as it arrived: valid, or rejected with why.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainRequest {
    Valid(Train),
    Rejected(String),
}

impl BytesConvertable for TrainRequest {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            TrainRequest::Valid(t) => encode(
                Kind::Train,
                &TrainOnWire {
                    dist: t.dist,
                    fault: t.fault,
                    left_ms: t.deadline_ms.saturating_sub(now_ms()),
                    stamp: to_wall_clock(t.stamp),
                },
            ),
            // Forwarded only to be rejected again: no valid bytes stand for it.
            TrainRequest::Rejected(_) => Vec::new(),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        match decode::<TrainOnWire>(Kind::Train, &bytes) {
            Ok(t) => TrainRequest::Valid(Train {
                dist: t.dist,
                fault: t.fault,
                deadline_ms: now_ms().saturating_add(t.left_ms),
                stamp: from_wall_clock(t.stamp),
            }),
            Err(why) => TrainRequest::Rejected(why),
        }
    }
}

/// A client's answer to a request: its update and when it was sent, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReply(pub Result<(ClientUpdate, Stamp), String>);

impl BytesConvertable for TrainReply {
    fn into_bytes(self) -> Vec<u8> {
        encode(Kind::TrainReply, &self.0.map(|(u, stamp)| (u, to_wall_clock(stamp))))
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        let reply: Result<(ClientUpdate, Stamp), String> = decode(Kind::TrainReply, &bytes)
            .unwrap_or_else(|e| Err(format!("undecodable reply: {e}")));
        TrainReply(reply.map(|(u, stamp)| (u, from_wall_clock(stamp))))
    }
}

/// A client process asking to take part: its node's name, the sites it runs, its configuration
/// (JSON), which must match the server's outside the per-process sections, and the fingerprint
/// of the corpus it loaded ([`fedbpt::data::Dataset::fingerprint`]), which must match the
/// server's: the same `data.path` can hold other data on another machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub node: String,
    pub sites: Vec<usize>,
    pub config: String,
    pub data: String,
}

/// A join request as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum JoinRequest {
    Valid(Join),
    Rejected(String),
}

impl BytesConvertable for JoinRequest {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            JoinRequest::Valid(j) => encode(Kind::Join, &j),
            JoinRequest::Rejected(_) => Vec::new(),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        decode(Kind::Join, &bytes).map_or_else(JoinRequest::Rejected, JoinRequest::Valid)
    }
}

/// The server's answer: admitted, or refused with why.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinReply(pub Result<(), String>);

impl BytesConvertable for JoinReply {
    fn into_bytes(self) -> Vec<u8> {
        encode(Kind::JoinReply, &self.0)
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        JoinReply(
            decode(Kind::JoinReply, &bytes)
                .unwrap_or_else(|e| Err(format!("undecodable reply: {e}"))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train() -> Train {
        Train {
            dist: SearchDistribution { round: 3, mean: vec![0.5; 4], sigma: 0.4, covariance: None },
            fault: Some(ClientFault::Delay(std::time::Duration::from_millis(1500))),
            deadline_ms: now_ms() + 60_000,
            stamp: Stamp { id: 7, sent_us: 11 },
        }
    }

    fn rejected(b: Vec<u8>) -> String {
        match TrainRequest::from_bytes(b) {
            TrainRequest::Rejected(why) => why,
            TrainRequest::Valid(t) => panic!("accepted {t:?}"),
        }
    }

    #[test]
    fn requests_and_replies_round_trip_with_the_time_left() {
        let t = train();
        let TrainRequest::Valid(back) =
            TrainRequest::from_bytes(TrainRequest::Valid(t.clone()).into_bytes())
        else {
            panic!("rejected")
        };
        // Profiling is off in this process: stamps do not cross.
        assert_eq!((&back.dist, back.fault, back.stamp), (&t.dist, t.fault, Stamp::default()));
        // The deadline is carried as the time left: equal up to the milliseconds this took.
        assert!(
            back.deadline_ms.abs_diff(t.deadline_ms) < 1_000,
            "{} vs {}",
            back.deadline_ms,
            t.deadline_ms
        );
        let update = ClientUpdate {
            client: 2,
            round: 3,
            mean: vec![0.25; 4],
            fitness: 0.5,
            loss: 0.6,
            sigmas: vec![0.4, 0.38],
            start_fitness: None,
            class_counts: Vec::new(),
        };
        let ok = TrainReply(Ok((update, Stamp::default())));
        assert_eq!(TrainReply::from_bytes(ok.clone().into_bytes()), ok);
        let err = TrainReply(Err("deadline passed".into()));
        assert_eq!(TrainReply::from_bytes(err.clone().into_bytes()), err);
        let join = JoinRequest::Valid(Join {
            node: "n".into(),
            sites: vec![0, 4],
            config: "{}".into(),
            data: "ab".into(),
        });
        assert_eq!(JoinRequest::from_bytes(join.clone().into_bytes()), join);
    }

    #[test]
    fn foreign_old_mistyped_oversize_and_garbage_payloads_are_rejected_with_a_reason() {
        let good = TrainRequest::Valid(train()).into_bytes();
        assert!(rejected(b"GIF89a".to_vec()).contains("magic"));
        let mut old = good.clone();
        old[4] = 0;
        assert!(rejected(old).contains("version 0"));
        assert!(rejected(good[..good.len() - 3].to_vec()).contains("does not decode"));
        let mut extra = good.clone();
        extra.push(0);
        assert!(rejected(extra).contains("left over"));
        assert!(rejected(vec![0; MAX_PAYLOAD + 100]).contains("exceeds the limit"));
        assert!(rejected(Vec::new()).contains("magic"));
        assert!(rejected(b"FBPT\x01".to_vec()).contains("inside its header"));
        // A valid payload of another message is no request.
        let reply = TrainReply(Err("x".into())).into_bytes();
        assert!(rejected(reply).contains("TrainReply payload where a Train belongs"));
        let join = JoinRequest::Valid(Join {
            node: "n".into(),
            sites: vec![],
            config: String::new(),
            data: String::new(),
        });
        assert!(rejected(join.into_bytes()).contains("Join payload"));
        // Replies that do not decode become an error the server records.
        let TrainReply(r) = TrainReply::from_bytes(b"FBPT\x01\x00\x02\xff\xff".to_vec());
        assert!(r.unwrap_err().contains("undecodable reply"));
    }
}
