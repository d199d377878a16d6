//! Why a replay message is refused or a replay fails.

use thiserror::Error;

/// A replay message refused, or a replay that cannot be carried out. Each says what is at fault:
/// the message kind for bytes that do not decode, and the client, round and iteration for a
/// record that decodes but does not fit, so a server can log it and exclude the reply.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The bytes end before the message does.
    #[error("{what}: truncated message")]
    Truncated { what: &'static str },
    /// More bytes than a message of this kind may have.
    #[error("{what}: {len} bytes, at most {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    /// Bytes left over after a complete message.
    #[error("{what}: {extra} trailing bytes after the message")]
    TrailingBytes { what: &'static str, extra: usize },
    /// Another message kind or another layout version.
    #[error("{what}: tag {found:#04x}, expected {expected:#04x}")]
    WrongTag { what: &'static str, found: u8, expected: u8 },
    /// Bytes that do not decode (a bad variant, an over-long length, ...).
    #[error("{what}: malformed message: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// A message that cannot be encoded (a state too large, ...).
    #[error("{what}: cannot encode: {reason}")]
    Encode { what: &'static str, reason: String },
    /// An upload or digest of another round than the one it is applied to.
    #[error("message for round {found}, expected round {expected}")]
    WrongRound { expected: usize, found: usize },
    /// An upload that names another client than the one it came from.
    #[error("round {round}: upload names client {found}, it came from client {expected}")]
    WrongClient { round: usize, expected: usize, found: usize },
    /// A search seed that is not the one derived for this client and round.
    #[error("round {round}, client {client}: seed {found:#x}, expected {expected:#x}")]
    WrongSeed { round: usize, client: usize, expected: u64, found: u64 },
    /// The client searched from another distribution than the server's for the round.
    #[error(
        "round {round}, client {client}: searched from distribution {found}, the server's is \
         {expected} (its replica is out of date)"
    )]
    WrongStart { round: usize, client: usize, expected: String, found: String },
    /// Not one ranking per local iteration.
    #[error("round {round}, client {client}: {found} rankings, expected {expected} (iterations)")]
    IterationCount { round: usize, client: usize, expected: usize, found: usize },
    /// A ranking that does not rank the whole population.
    #[error(
        "round {round}, client {client}, iteration {iteration}: ranking of {found} candidates, \
         expected {expected} (popsize)"
    )]
    RankingLength { round: usize, client: usize, iteration: usize, expected: usize, found: usize },
    /// A candidate index beyond the population.
    #[error(
        "round {round}, client {client}, iteration {iteration}: candidate {index} out of range \
         (popsize {popsize})"
    )]
    IndexOutOfRange { round: usize, client: usize, iteration: usize, index: u32, popsize: usize },
    /// A candidate ranked twice.
    #[error("round {round}, client {client}, iteration {iteration}: candidate {index} repeated")]
    RepeatedIndex { round: usize, client: usize, iteration: usize, index: u32 },
    /// A fitness, loss or start fitness that is NaN or infinite.
    #[error("round {round}, client {client}: {what} is {value}")]
    NonFinite { round: usize, client: usize, what: &'static str, value: f64 },
    /// The told clients of a digest are not in strictly increasing order (or one is repeated).
    #[error("round {round}: told client {client} out of order or repeated")]
    ToldOrder { round: usize, client: usize },
    /// A digest applied out of turn: a replica applies every round in order.
    #[error("digest of round {found}, the replica expects round {expected}")]
    RoundOrder { expected: usize, found: usize },
    /// After replaying a round, the replica's state differs from the server's: it must be
    /// resynchronized ([`super::Replica::resync`]).
    #[error("round {round}: replica state {found}, server state {expected}: out of sync")]
    StateMismatch { round: usize, expected: String, found: String },
    /// The replica diverged earlier and has not been resynchronized since.
    #[error("replica is out of sync since round {round}: resynchronize it first")]
    Desynced { round: usize },
    /// A state transfer whose content does not hash to the hash it carries.
    #[error("state transfer for round {round}: content hashes to {found}, it says {expected}")]
    TransferHash { round: usize, expected: String, found: String },
    /// A local search or aggregation step that fails on replay (as it failed live).
    #[error(transparent)]
    Method(#[from] crate::Error),
}
