pub mod config;
pub mod socket;
