//! `traffic = "replay"` (issue 29, docs/traffic.md) in the runtime: the messages of a replayed
//! round, the client's replica ([`client`]) and the server's digest log ([`server`]). The
//! method's side (uploads, digests, replicas, state transfers) is [`fedbpt::replay`]; this
//! module only moves its encoded messages.

pub mod client;
pub mod server;

use ractor::BytesConvertable;
use serde::{Deserialize, Serialize};

use crate::profile::{from_wall_clock, now_ms, to_wall_clock, Stamp};
use crate::wire::{decode, encode, ClientFault, Kind};

/// What a client receives before its search in replay mode: what its replica misses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Download {
    /// The round to search.
    pub round: usize,
    /// An encoded [`fedbpt::replay::StateTransfer`], applied first.
    pub transfer: Option<Vec<u8>>,
    /// Encoded [`fedbpt::replay::RoundDigest`]s, in round order.
    pub digests: Vec<Vec<u8>>,
}

impl Download {
    /// The payload bytes it moves (the records' `bytes_down`).
    pub fn bytes(&self) -> usize {
        self.transfer.as_ref().map_or(0, Vec::len)
            + self.digests.iter().map(Vec::len).sum::<usize>()
    }
}

/// One round's request in replay mode (what [`crate::wire::Train`] is in distribution mode).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayTrain {
    pub download: Download,
    pub fault: Option<ClientFault>,
    /// The round's deadline, milliseconds since the Unix epoch on this host.
    pub deadline_ms: u64,
    pub stamp: Stamp,
}

#[derive(Serialize, Deserialize)]
struct ReplayTrainOnWire {
    download: Download,
    fault: Option<ClientFault>,
    left_ms: u64,
    stamp: Stamp,
}

/// A replay request as it arrived: valid, or rejected with why.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayRequest {
    Valid(ReplayTrain),
    Rejected(String),
}

impl BytesConvertable for ReplayRequest {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            ReplayRequest::Valid(t) => encode(
                Kind::ReplayTrain,
                &ReplayTrainOnWire {
                    download: t.download,
                    fault: t.fault,
                    left_ms: t.deadline_ms.saturating_sub(now_ms()),
                    stamp: to_wall_clock(t.stamp),
                },
            ),
            // Forwarded only to be rejected again: no valid bytes stand for it.
            ReplayRequest::Rejected(_) => Vec::new(),
        }
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        match decode::<ReplayTrainOnWire>(Kind::ReplayTrain, &bytes) {
            Ok(t) => ReplayRequest::Valid(ReplayTrain {
                download: t.download,
                fault: t.fault,
                deadline_ms: now_ms().saturating_add(t.left_ms),
                stamp: from_wall_clock(t.stamp),
            }),
            Err(why) => ReplayRequest::Rejected(why),
        }
    }
}

/// A client's answer in replay mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// Its encoded [`fedbpt::replay::Upload`].
    Upload(Vec<u8>),
    /// Its replica needs the digests from `next_round` on (it restarted, or missed rounds the
    /// server did not know of).
    Behind { next_round: usize },
    /// Its replica did not replay to the server's hash: it needs the state.
    Diverged { why: String },
}

/// A client's reply in replay mode: its answer and when it was sent, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayReply(pub Result<(Answer, Stamp), String>);

impl BytesConvertable for ReplayReply {
    fn into_bytes(self) -> Vec<u8> {
        encode(Kind::ReplayReply, &self.0.map(|(a, stamp)| (a, to_wall_clock(stamp))))
    }

    fn from_bytes(bytes: Vec<u8>) -> Self {
        let reply: Result<(Answer, Stamp), String> = decode(Kind::ReplayReply, &bytes)
            .unwrap_or_else(|e| Err(format!("undecodable reply: {e}")));
        ReplayReply(reply.map(|(a, stamp)| (a, from_wall_clock(stamp))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Train, TrainRequest};

    fn request() -> ReplayTrain {
        ReplayTrain {
            download: Download { round: 3, transfer: None, digests: vec![vec![0x52, 1, 2]] },
            fault: Some(ClientFault::CorruptReplica),
            deadline_ms: now_ms() + 60_000,
            stamp: Stamp::default(),
        }
    }

    #[test]
    fn replay_messages_round_trip_and_garbage_is_rejected_with_why() {
        let sent = request();
        let ReplayRequest::Valid(got) =
            ReplayRequest::from_bytes(ReplayRequest::Valid(sent.clone()).into_bytes())
        else {
            panic!("a valid request was rejected");
        };
        assert_eq!((got.download, got.fault), (sent.download, sent.fault));
        // The time left travels, not the host's clock.
        assert!(got.deadline_ms.abs_diff(sent.deadline_ms) < 5_000);

        let rejected = |bytes: Vec<u8>| match ReplayRequest::from_bytes(bytes) {
            ReplayRequest::Rejected(why) => why,
            ReplayRequest::Valid(_) => panic!("garbage accepted"),
        };
        assert!(!rejected(vec![0xff; 40]).is_empty());
        assert!(!rejected(Vec::new()).is_empty());
        let mut cut = ReplayRequest::Valid(request()).into_bytes();
        cut.truncate(cut.len() - 2);
        assert!(!rejected(cut).is_empty());
        // Another message's valid bytes are named as such.
        let train = Train {
            dist: fedbpt::protocol::SearchDistribution {
                round: 1,
                mean: vec![0.0; 4],
                sigma: 1.0,
                covariance: None,
            },
            fault: None,
            deadline_ms: now_ms() + 1_000,
            stamp: Stamp::default(),
        };
        let why = rejected(TrainRequest::Valid(train).into_bytes());
        assert!(why.contains("Train") && why.contains("ReplayTrain"), "{why}");

        let answer = (Answer::Behind { next_round: 2 }, Stamp::default());
        let back = ReplayReply::from_bytes(ReplayReply(Ok(answer.clone())).into_bytes());
        assert_eq!(back.0, Ok(answer));
        let ReplayReply(garbage) = ReplayReply::from_bytes(vec![1, 2, 3]);
        assert!(garbage.unwrap_err().contains("undecodable reply"));
    }
}
