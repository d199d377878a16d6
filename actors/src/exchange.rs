//! One client's part in a round's attempt, as the server sees it, whichever the traffic.

use fedbpt::protocol::ClientUpdate;
use fedbpt::replay::Upload;

use crate::profile::Stamp;

/// One client's part in an attempt, as the server sees it.
pub(crate) struct Exchanged {
    pub outcome: Outcome,
    /// Payload bytes sent to the client.
    pub bytes_down: usize,
    /// Whether its replica diverged and was sent the state.
    pub resynced: bool,
}

pub(crate) enum Outcome {
    Ok(Box<Received>, Stamp),
    Late,
    Failed(String),
}

/// A reply's update, with the upload it was replayed from (replay mode) and its bytes.
pub(crate) struct Received {
    pub update: ClientUpdate,
    pub upload: Option<Upload>,
    pub bytes_up: usize,
}
