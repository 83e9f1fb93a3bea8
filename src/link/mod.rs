//! The links sessions connect through: `whatsapp` (the real network, on whatsapp-rust)
//! and `sim` (a simulated network for tests and demos). Both implement
//! `botvisor_actors::Link`; the supervisor never sees which one runs.

pub mod sim;
pub mod whatsapp;
