// TLS with GnuTLS: the credentials of a listener and the session of one
// connection (docs/ARCHITECTURE.md, "TLS").
//
// TlsCredentials are loaded once per listener at start-up and shared,
// read-only, by all its connections: X.509 (ca-cert.pem, server-cert.pem,
// server-key.pem, optional ca-crl.pem, in the directory layout qemu and
// nbdkit read) and/or PSK (psktool's "username:hexkey" file). Loading checks
// every file and throws ConfigError naming the one that is missing,
// unreadable or malformed, so a bad key never reaches a client.
//
// A TlsSession lives from STARTTLS to the end of the connection. The
// handshake phase drives it without blocking (handshake_step, recv, send
// return kAgain, and wants_write says which way to wait); the transmission
// phase then uses it through TlsTransport with blocking calls. GnuTLS lets
// one thread receive while another sends on one session, which is the
// transmission threads' rule (one reader under the read mutex, one sender
// under the write mutex). Renegotiation is refused: a client asking for it
// is disconnected.
//
// Identity: with verify_peer the client's certificate must be signed by the
// CA (GnuTLS checks chain, dates and the CRL during the handshake) and its
// subject DN (RFC 4514, e.g. "CN=client,O=Example") is the identity; with
// PSK the username is. Export allow lists match it (protocol/handshake.h).
#pragma once

#include <gnutls/gnutls.h>
#include <sys/types.h>

#include <map>
#include <memory>
#include <string>

#include "config/config.h"
#include "server/transport.h"

namespace strata {

class TlsCredentials {
 public:
  // Throws ConfigError naming the file at fault.
  static std::shared_ptr<const TlsCredentials> load(const TlsConfig& config);
  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  bool verify_peer() const { return verify_peer_; }
  // Sets up a new server session with these credentials.
  void configure(gnutls_session_t session) const;
  // The key of a PSK user, or nullptr.
  const std::string* psk_key(const std::string& username) const;

 private:
  TlsCredentials() = default;
  void load_x509(const std::string& dir);
  void load_psk(const std::string& file);
  void load_priority(const std::string& priority);

  gnutls_certificate_credentials_t x509_ = nullptr;
  gnutls_psk_server_credentials_t psk_ = nullptr;
  gnutls_priority_t priority_ = nullptr;
  bool verify_peer_ = false;
  std::map<std::string, std::string> psk_keys_;  // username -> raw key bytes
};

class TlsSession {
 public:
  // Results of the calls below other than byte counts.
  static constexpr ssize_t kAgain = -1;   // would block: wait (wants_write says how)
  static constexpr ssize_t kFailed = -2;  // the session is dead; error() says why

  // The session for a connected socket `fd` (not owned).
  TlsSession(std::shared_ptr<const TlsCredentials> credentials, int fd);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // One step of the TLS handshake: 0 when it is complete, kAgain, kFailed.
  ssize_t handshake_step();
  // The client's identity once the handshake is complete ("" if none).
  std::string identity() const;
  // GnuTLS's description of the session, e.g. "(TLS1.3)-(ECDHE-SECP256R1)-...".
  std::string describe() const;

  // Non-blocking or blocking, as the socket is: bytes, 0 at a clean end of
  // stream, kAgain or kFailed.
  ssize_t recv(void* dst, size_t n);
  ssize_t send(const void* src, size_t n);
  // Like recv, from bytes already received only (never the socket): kAgain
  // when they hold no whole record.
  ssize_t recv_buffered(void* dst, size_t n);
  // After kAgain: true if the call waits for the socket to be writable.
  bool wants_write() const;
  // Sends a close_notify without waiting for the peer's.
  void bye();
  const std::string& error() const { return error_; }

  gnutls_session_t get() const { return session_; }

 private:
  ssize_t result(int rc);

  std::shared_ptr<const TlsCredentials> credentials_;
  gnutls_session_t session_ = nullptr;
  std::string error_;
};

// The transmission phase over a TLS session. Replies are corked so that one
// batch of replies goes out in as few records as possible.
class TlsTransport final : public Transport {
 public:
  TlsTransport(TlsSession& session, int fd, int send_timeout_ms);
  ssize_t recv_some(void* dst, size_t n) override;
  bool send_all(std::span<iovec> iov) override;
  void shutdown(int how) override;

 private:
  // Appends to dst[have, n) what records already received hold; returns
  // how many bytes.
  size_t recv_buffered(void* dst, size_t have, size_t n);

  TlsSession& session_;
  const int fd_;
};

}  // namespace strata
