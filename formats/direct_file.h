// Direct I/O (cache mode "none"): image files read and written with O_DIRECT,
// so serving an image never fills the host's page cache.
//
// Invariants:
//  - Every byte of data goes through the O_DIRECT descriptor; the page cache
//    never holds a page of the file because of Strata. A second, buffered
//    descriptor is kept only for what carries no data (flock, fdatasync,
//    fallocate, ftruncate, lseek, fstat).
//  - O_DIRECT needs the file offset, the length and the memory address of an
//    I/O aligned (statx STATX_DIOALIGN; 4096 where the kernel does not say).
//    Aligned I/O goes straight to the caller's buffer; otherwise through an
//    aligned bounce buffer: a read reads the covering aligned range, a write
//    writes its aligned middle directly and each partial block at its edges
//    by read-modify-write.
//  - A read-modify-write holds the lock of its block (one of a fixed set of
//    striped mutexes) from the read to the write, so two writes to different
//    bytes of one block both land. A write that covers a block whole takes no
//    lock: it overlaps every write to that block, and overlapping writes in
//    flight together have no defined result in NBD.
//  - Zeroing and hole punching go through fallocate for whole blocks and
//    through read-modify-write for partial blocks at the edges, so no
//    partial-block zeroing happens in the page cache either.
//  - Sizes: a write leaves the file the size a buffered write would, except
//    that a write past an aligned end extends it to a block boundary. While
//    the size is not a multiple of the alignment (a raw disk of an odd size,
//    a qcow2 as qemu-img creates it), writes run one at a time and cut the
//    file back after writing its partial last block whole.
#pragma once

#include <cstddef>
#include <memory>

#include "formats/file_system.h"

namespace strata {

// Buffers aligned to this suit direct I/O on every device Linux has (logical
// blocks up to 4096 bytes), so they need no bounce buffer.
inline constexpr size_t kDirectIoBufferAlignment = 4096;

// The host file system with every file opened for direct I/O. open() throws
// ImageError naming the path when the file system cannot do direct I/O.
std::shared_ptr<FileSystem> direct_file_system();

}  // namespace strata
