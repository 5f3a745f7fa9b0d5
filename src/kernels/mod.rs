//! Compute kernels, by device.

pub mod cpu;
