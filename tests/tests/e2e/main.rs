//! End-to-end tests: the real `hb` binary on real and crafted layers.

mod architecture;
mod bad_input;
mod crafted;
mod crash;
mod daemon;
mod dedup_gc;
mod delta;
mod doctor;
mod full_disk;
mod integrity;
mod lazy;
mod package;
mod peers;
mod proxy;
mod pull;
mod roundtrip;
mod run;
mod snapshotter;
mod soak;
mod standby;
mod startup;
