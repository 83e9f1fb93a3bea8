//! The links sessions connect through: `sim` (simulated) now; the real WhatsApp link
//! plugs into the same `botvisor_actors::Link` trait.

pub mod sim;
