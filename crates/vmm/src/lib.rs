//! `vmm`: memvisor's KVM layer.
//!
//! A VM on /dev/kvm with anonymous guest RAM (vm-memory), handed out so that the layers above
//! (the pager, snapshots) can manage it; vCPUs each on a thread; port I/O devices (a 16550
//! console from vm-superio, an exit port, the i8042 reset); and the x86 boot path of the guest
//! kit: long mode, identity-mapped, started directly in ring 3, where KVM's PVM backend runs
//! guest code natively. A [`Control`] lets the host follow and stop a running kit guest, and
//! pause it: [`Control::pause`] parks every vCPU with its I/O complete and captures the VM's
//! state ([`VmState`], with a versioned byte format), which [`Vm::restore_image_ctl`] starts
//! on a new VM. [`Vm::load_replay`] sets up the replay guest, which walks a real memory image
//! with a hot/warm/cold skew. docs/vmm.md has the details and what was measured.
#![warn(missing_docs)]

pub mod control;
pub mod devices;
pub mod kit;
pub mod kvmstats;
pub mod linux;
pub mod loader;
pub mod replay;
pub mod schedstat;
pub mod state;
mod vm;
pub mod x86;

pub use control::{Control, Paused};
pub use kvmstats::KvmCounters;
pub use linux::{LinuxBoot, LinuxError};
pub use replay::{ReplayError, ReplayParams, replay_ram_size};
pub use schedstat::SchedTimes;
pub use state::{StateError, VmState};
pub use vm::{Exit, Vm, VmError};
