//! Loads a guest-kit image: a static, non-PIE ELF64 executable, by its PT_LOAD segments.
//!
//! The guest kit's programs are linked at physical = virtual addresses above 1 MiB, so loading
//! is copying each segment's file bytes to its address and zeroing the rest of its memory
//! size. (The Linux boot path uses linux-loader; this one is ours because the kit's images are
//! plain executables, not kernels.)

use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, elf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::x86::IMAGE_MIN;

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// the image is not an ELF64 executable
    #[error("not a guest image (a static ELF64 executable)")]
    NotElf(#[source] object::Error),
    /// the ELF file is not an executable
    #[error("not an executable ELF file ({0}); guest images are static, non-PIE executables")]
    NotExecutable(String),
    /// a segment points past the end of the file
    #[error("a segment lies past the end of the image")]
    Truncated,
    /// a segment does not fit the guest's RAM
    #[error(
        "segment at {start:#x}..{end:#x} is outside guest RAM ({min:#x}..{ram:#x}): give the VM more memory"
    )]
    OutOfRange {
        /// segment start
        start: u64,
        /// segment end
        end: u64,
        /// lowest loadable address
        min: u64,
        /// RAM size
        ram: u64,
    },
    /// the image has nothing to load
    #[error("the image has no loadable segment")]
    Empty,
    /// copying into guest memory failed
    #[error("writing the image into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Copies `image` into `mem` (of `ram` bytes) and returns its entry point and the end of its
/// highest segment.
pub fn load(mem: &GuestMemoryMmap, ram: u64, image: &[u8]) -> Result<(u64, u64), LoadError> {
    let elf = ElfFile64::<Endianness>::parse(image).map_err(LoadError::NotElf)?;
    let e = elf.endian();
    let kind = elf.elf_header().e_type(e);
    if kind != elf::ET_EXEC {
        return Err(LoadError::NotExecutable(format!("{kind:?}")));
    }
    let mut top = 0;
    for ph in elf.elf_program_headers() {
        if ph.p_type(e) != elf::PT_LOAD {
            continue;
        }
        let (start, filesz, memsz) = (ph.p_paddr(e), ph.p_filesz(e), ph.p_memsz(e));
        let end = start.saturating_add(memsz.max(filesz));
        if start < IMAGE_MIN || end > ram {
            return Err(LoadError::OutOfRange {
                start,
                end,
                min: IMAGE_MIN,
                ram,
            });
        }
        let bytes = ph.data(e, image).map_err(|()| LoadError::Truncated)?;
        mem.write_slice(bytes, GuestAddress(start))
            .map_err(LoadError::Memory)?;
        let zeros = vec![0u8; usize::try_from(memsz.saturating_sub(filesz)).unwrap_or(0)];
        mem.write_slice(&zeros, GuestAddress(start + filesz))
            .map_err(LoadError::Memory)?;
        top = top.max(end);
    }
    if top == 0 {
        return Err(LoadError::Empty);
    }
    Ok((elf.elf_header().e_entry(e), top))
}
