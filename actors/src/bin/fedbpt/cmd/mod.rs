//! One module per command (the benchmarks are in `bench`).

pub mod bbt;
pub mod compare;
pub mod faults;
pub mod fetch;
pub mod plot;
pub mod run;
pub mod serve;
