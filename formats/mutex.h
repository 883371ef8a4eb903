// Lock types the thread-safety analysis understands (formats/thread_annotations.h):
// thin wrappers over std::mutex and std::shared_mutex with the same cost, plus
// scoped guards. Members a lock guards are declared GUARDED_BY(that lock), and
// functions that expect it held REQUIRES(it), so the rules are checked by the
// compiler rather than by reading.
//
// Condition variables: Mutex and SharedMutex are BasicLockable, so
// std::condition_variable_any waits on them (or on a MutexLock / WriterLock)
// directly. Wait in a loop (`while (!ready) cv.wait(lock);`) rather than with
// a predicate: the analysis checks a lambda as a function of its own, without
// the lock its caller holds.
#pragma once

#include <chrono>
#include <mutex>
#include <shared_mutex>

#include "formats/thread_annotations.h"

namespace strata {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  // Tells the analysis the caller holds the lock where it cannot see it (a
  // lock taken by a caller through a path it does not follow).
  void assert_held() const ASSERT_CAPABILITY(this) {}

 private:
  std::mutex mu_;
};

// A Mutex whose waiters may give up after a while (std::timed_mutex: the same
// pthread mutex, so the same cost). The wait is measured on the system
// clock: libstdc++ waits for a steady_clock deadline with
// pthread_mutex_clocklock, which GCC 12's ThreadSanitizer does not intercept
// (it then reports the lock as never taken). A clock step only makes one wait
// shorter or longer, which callers must tolerate.
class CAPABILITY("mutex") TimedMutex {
 public:
  TimedMutex() = default;
  TimedMutex(const TimedMutex&) = delete;
  TimedMutex& operator=(const TimedMutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  bool try_lock_for(std::chrono::milliseconds wait) TRY_ACQUIRE(true) {
    return mu_.try_lock_until(std::chrono::system_clock::now() + wait);
  }

 private:
  std::timed_mutex mu_;
};

class CAPABILITY("shared_mutex") SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  void lock_shared() ACQUIRE_SHARED() { mu_.lock_shared(); }
  void unlock_shared() RELEASE_SHARED() { mu_.unlock_shared(); }

 private:
  std::shared_mutex mu_;
};

// Holds a Mutex for its scope. unlock()/lock() in between are allowed (for a
// stretch of I/O without the lock, or a condition-variable wait).
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() RELEASE() {
    if (held_) mu_.unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void lock() ACQUIRE() {
    mu_.lock();
    held_ = true;
  }
  void unlock() RELEASE() {
    mu_.unlock();
    held_ = false;
  }

 private:
  Mutex& mu_;
  bool held_ = true;
};

// Holds a SharedMutex exclusively for its scope; unlock()/lock() as MutexLock.
class SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~WriterLock() RELEASE() {
    if (held_) mu_.unlock();
  }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

  void lock() ACQUIRE() {
    mu_.lock();
    held_ = true;
  }
  void unlock() RELEASE() {
    mu_.unlock();
    held_ = false;
  }

 private:
  SharedMutex& mu_;
  bool held_ = true;
};

// Releases a SharedMutex held exclusively for its scope and takes it back
// exclusively when the scope ends, also on unwinding: a stretch of I/O without
// the lock inside a WriterLock's scope.
class SCOPED_CAPABILITY WriterUnlock {
 public:
  explicit WriterUnlock(SharedMutex& mu) RELEASE(mu) : mu_(mu) { mu_.unlock(); }
  // The analysis has a scoped capability's destructor undo what its
  // constructor did, whatever the annotation: this one takes the lock back.
  ~WriterUnlock() RELEASE() { mu_.lock(); }
  WriterUnlock(const WriterUnlock&) = delete;
  WriterUnlock& operator=(const WriterUnlock&) = delete;

 private:
  SharedMutex& mu_;
};

// Holds a SharedMutex shared for its scope.
class SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& mu) ACQUIRE_SHARED(mu) : mu_(mu) { mu_.lock_shared(); }
  ~ReaderLock() RELEASE() { mu_.unlock_shared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& mu_;
};

}  // namespace strata
