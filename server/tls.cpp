#include "server/tls.h"

#include <gnutls/x509.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

namespace strata {

namespace {

namespace fs = std::filesystem;

// Versions below TLS 1.2 are never offered, whatever the priority string.
constexpr const char* kNoOldVersions = "-VERS-SSL3.0:-VERS-TLS1.0:-VERS-TLS1.1";
// PSK key exchanges, which GnuTLS's default priorities leave out (qemu adds
// the same).
constexpr const char* kPskExchanges = "+ECDHE-PSK:+DHE-PSK:+PSK";
// Replies up to this size are gathered into the cork buffer; larger ones
// (read data) are encrypted straight from where they are.
constexpr size_t kCorkedMax = size_t{16} * 1024;

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw ConfigError(file + ": " + what);
}

void require_readable(const std::string& file) {
  std::ifstream in(file);
  if (!in) fail(file, std::string("cannot read: ") + std::strerror(errno));
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// psktool's line: "username:hexkey". Usernames hold no '=' so that no PSK
// identity can pass for an X.509 DN in an allow list.
std::pair<std::string, std::string> parse_psk_line(const std::string& line,
                                                   const std::string& where) {
  const auto colon = line.find(':');
  if (colon == std::string::npos || colon == 0) {
    fail(where, "expected username:hexkey (as psktool writes)");
  }
  std::string user = line.substr(0, colon);
  if (user.find('=') != std::string::npos) fail(where, "a PSK username must not contain '='");
  const std::string hex = line.substr(colon + 1);
  if (hex.empty() || hex.size() % 2) fail(where, "the key must be an even number of hex digits");
  std::string key;
  for (size_t i = 0; i < hex.size(); i += 2) {
    const int hi = hex_value(hex[i]), lo = hex_value(hex[i + 1]);
    if (hi < 0 || lo < 0) fail(where, "the key must be hex digits");
    key.push_back(static_cast<char>(hi * 16 + lo));
  }
  return {std::move(user), std::move(key)};
}

// GnuTLS asks for a PSK user's key during the handshake. The session's user
// pointer is its credentials (TlsCredentials::configure).
int psk_lookup(gnutls_session_t session, const char* username, gnutls_datum_t* key) {
  const auto* creds = static_cast<const TlsCredentials*>(gnutls_session_get_ptr(session));
  const std::string* k = creds ? creds->psk_key(username) : nullptr;
  if (!k) return -1;  // unknown user: the handshake fails
  key->data = static_cast<unsigned char*>(gnutls_malloc(k->size()));
  if (!key->data) return -1;
  std::memcpy(key->data, k->data(), k->size());
  key->size = static_cast<unsigned>(k->size());
  return 0;
}

// Receives for GnuTLS through a read-ahead buffer: GnuTLS asks for a
// record's 5-byte header and then its body, two system calls per record
// without one. Only the receiving thread calls it. With buffered_only set
// it never touches the socket: an empty buffer is EAGAIN, and GnuTLS keeps
// the part of a record it has and resumes on the next receive.
struct ReadAhead {
  int fd;
  std::vector<uint8_t> buf = std::vector<uint8_t>(size_t{64} * 1024);
  size_t pos = 0, end = 0;
  bool buffered_only = false;
};

ssize_t pull(gnutls_transport_ptr_t p, void* dst, size_t n) {
  auto* ra = static_cast<ReadAhead*>(p);
  if (ra->pos == ra->end) {
    if (ra->buffered_only) {
      errno = EAGAIN;
      return -1;
    }
    const ssize_t got = ::recv(ra->fd, ra->buf.data(), ra->buf.size(), 0);
    if (got <= 0) return got;  // errno (EAGAIN, EINTR...) is what GnuTLS reads
    ra->pos = 0;
    ra->end = static_cast<size_t>(got);
  }
  const size_t k = std::min(n, ra->end - ra->pos);
  std::memcpy(dst, ra->buf.data() + ra->pos, k);
  ra->pos += k;
  return static_cast<ssize_t>(k);
}

int pull_timeout(gnutls_transport_ptr_t p, unsigned ms) {
  auto* ra = static_cast<ReadAhead*>(p);
  if (ra->pos < ra->end) return 1;
  pollfd pfd{ra->fd, POLLIN, 0};
  const int timeout = ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : static_cast<int>(ms);
  return ::poll(&pfd, 1, timeout);
}

ssize_t push(gnutls_transport_ptr_t p, const giovec_t* iov, int count) {
  auto* ra = static_cast<ReadAhead*>(p);
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(reinterpret_cast<const iovec*>(iov));
  msg.msg_iovlen = static_cast<size_t>(count);
  return ::sendmsg(ra->fd, &msg, MSG_NOSIGNAL);
}

std::string gnutls_message(int rc) { return gnutls_strerror(rc); }

}  // namespace

// ---- TlsCredentials ----

std::shared_ptr<const TlsCredentials> TlsCredentials::load(const TlsConfig& config) {
  std::shared_ptr<TlsCredentials> c(new TlsCredentials());
  c->verify_peer_ = config.verify_peer;
  if (!config.certificates.empty()) c->load_x509(config.certificates);
  if (!config.psk_file.empty()) c->load_psk(config.psk_file);
  c->load_priority(config.priority);
  return c;
}

TlsCredentials::~TlsCredentials() {
  if (x509_) gnutls_certificate_free_credentials(x509_);
  if (psk_) gnutls_psk_free_server_credentials(psk_);
  if (priority_) gnutls_priority_deinit(priority_);
}

void TlsCredentials::load_x509(const std::string& dir) {
  if (!fs::is_directory(dir)) fail(dir, "is not a directory of certificates");
  const std::string ca = dir + "/ca-cert.pem", crl = dir + "/ca-crl.pem",
                    cert = dir + "/server-cert.pem", key = dir + "/server-key.pem";
  require_readable(cert);
  require_readable(key);
  if (int rc = gnutls_certificate_allocate_credentials(&x509_); rc < 0) {
    fail(dir, gnutls_message(rc));
  }
  if (int rc = gnutls_certificate_set_x509_key_file(x509_, cert.c_str(), key.c_str(),
                                                    GNUTLS_X509_FMT_PEM);
      rc < 0) {
    fail(cert, "with " + key + ": " + gnutls_message(rc));
  }
  if (fs::exists(ca)) {
    require_readable(ca);
    const int n = gnutls_certificate_set_x509_trust_file(x509_, ca.c_str(), GNUTLS_X509_FMT_PEM);
    if (n < 0) fail(ca, gnutls_message(n));
    if (n == 0) fail(ca, "holds no certificate");
  } else if (verify_peer_) {
    fail(ca, "is needed to verify client certificates");
  }
  if (fs::exists(crl)) {
    require_readable(crl);
    const int n = gnutls_certificate_set_x509_crl_file(x509_, crl.c_str(), GNUTLS_X509_FMT_PEM);
    if (n < 0) fail(crl, gnutls_message(n));
  }
  gnutls_certificate_set_known_dh_params(x509_, GNUTLS_SEC_PARAM_MEDIUM);
}

void TlsCredentials::load_psk(const std::string& file) {
  std::ifstream in(file);
  if (!in) fail(file, std::string("cannot read: ") + std::strerror(errno));
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    auto [user, key] = parse_psk_line(line, file + ":" + std::to_string(n));
    psk_keys_[user] = std::move(key);
  }
  if (psk_keys_.empty()) fail(file, "holds no username:hexkey line");
  if (int rc = gnutls_psk_allocate_server_credentials(&psk_); rc < 0) {
    fail(file, gnutls_message(rc));
  }
  gnutls_psk_set_server_credentials_function(psk_, psk_lookup);
}

void TlsCredentials::load_priority(const std::string& priority) {
  std::string extra = kNoOldVersions;
  if (psk_) extra += std::string(":") + kPskExchanges;
  // error_at points into the string given to GnuTLS: it must outlive the message.
  const std::string full = priority.empty() ? extra : priority + ":" + extra;
  const char* error_at = nullptr;
  const int rc = priority.empty() ? gnutls_priority_init2(&priority_, full.c_str(), &error_at,
                                                          GNUTLS_PRIORITY_INIT_DEF_APPEND)
                                  : gnutls_priority_init(&priority_, full.c_str(), &error_at);
  if (rc < 0) {
    throw ConfigError("tls.priority: '" + priority + "' is refused by GnuTLS" +
                      (error_at ? std::string(" at '") + error_at + "'" : std::string()) + ": " +
                      gnutls_message(rc));
  }
}

void TlsCredentials::configure(gnutls_session_t session) const {
  gnutls_session_set_ptr(session, const_cast<TlsCredentials*>(this));
  gnutls_priority_set(session, priority_);
  if (x509_) {
    gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, x509_);
    gnutls_certificate_server_set_request(session,
                                          verify_peer_ ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_IGNORE);
    if (verify_peer_) gnutls_session_set_verify_cert(session, nullptr, 0);
  }
  if (psk_) gnutls_credentials_set(session, GNUTLS_CRD_PSK, psk_);
}

const std::string* TlsCredentials::psk_key(const std::string& username) const {
  auto it = psk_keys_.find(username);
  return it == psk_keys_.end() ? nullptr : &it->second;
}

// ---- TlsSession ----

TlsSession::TlsSession(std::shared_ptr<const TlsCredentials> credentials, int fd)
    : credentials_(std::move(credentials)) {
  if (int rc = gnutls_init(&session_, GNUTLS_SERVER | GNUTLS_NO_SIGNAL); rc < 0) {
    session_ = nullptr;
    throw std::runtime_error("TLS session: " + gnutls_message(rc));
  }
  credentials_->configure(session_);
  // The connection's own timer bounds the handshake (limits.handshake_timeout_ms).
  gnutls_handshake_set_timeout(session_, 0);
  auto* ra = new ReadAhead{fd};
  gnutls_transport_set_ptr(session_, ra);
  gnutls_transport_set_pull_function(session_, pull);
  gnutls_transport_set_pull_timeout_function(session_, pull_timeout);
  gnutls_transport_set_vec_push_function(session_, push);
}

TlsSession::~TlsSession() {
  if (!session_) return;
  delete static_cast<ReadAhead*>(gnutls_transport_get_ptr(session_));
  gnutls_deinit(session_);
}

ssize_t TlsSession::result(int rc) {
  if (rc >= 0) return rc;
  if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return kAgain;
  if (rc == GNUTLS_E_PREMATURE_TERMINATION) return 0;  // closed without close_notify
  error_ = rc == GNUTLS_E_REHANDSHAKE ? "the client asked to renegotiate" : gnutls_message(rc);
  return kFailed;
}

ssize_t TlsSession::handshake_step() {
  for (;;) {
    const int rc = gnutls_handshake(session_);
    if (rc == 0) break;
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) return kAgain;
    if (!gnutls_error_is_fatal(rc)) continue;  // a warning alert: go on
    error_ = gnutls_message(rc);
    if (const auto alert = gnutls_alert_get(session_);
        rc == GNUTLS_E_FATAL_ALERT_RECEIVED && alert) {
      error_ += std::string(" (") + gnutls_alert_get_name(alert) + ")";
    }
    return kFailed;
  }
  // A PSK client proved itself with its key; verify_peer is about certificates.
  if (credentials_->verify_peer() && gnutls_auth_get_type(session_) == GNUTLS_CRD_CERTIFICATE) {
    unsigned status = 0;
    const int rc = gnutls_certificate_verify_peers2(session_, &status);
    if (rc < 0 || status != 0) {
      error_ = "client certificate not accepted";
      gnutls_datum_t out{};
      if (rc >= 0 &&
          gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        error_ += std::string(": ") + reinterpret_cast<const char*>(out.data);
        gnutls_free(out.data);
      }
      return kFailed;
    }
  }
  return 0;
}

std::string TlsSession::identity() const {
  if (const char* user = gnutls_psk_server_get_username(session_); user && *user) return user;
  if (!credentials_->verify_peer()) return "";  // an unchecked certificate names nobody
  unsigned n = 0;
  const gnutls_datum_t* certs = gnutls_certificate_get_peers(session_, &n);
  if (!certs || n == 0) return "";
  gnutls_x509_crt_t crt;
  if (gnutls_x509_crt_init(&crt) < 0) return "";
  std::string dn;
  gnutls_datum_t out{};
  if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) >= 0 &&
      gnutls_x509_crt_get_dn3(crt, &out, 0) >= 0) {
    dn.assign(reinterpret_cast<const char*>(out.data), out.size);
    gnutls_free(out.data);
  }
  gnutls_x509_crt_deinit(crt);
  return dn;
}

std::string TlsSession::describe() const {
  char* d = gnutls_session_get_desc(session_);
  std::string s = d ? d : "";
  gnutls_free(d);
  return s;
}

ssize_t TlsSession::recv(void* dst, size_t n) {
  return result(static_cast<int>(gnutls_record_recv(session_, dst, n)));
}

ssize_t TlsSession::recv_buffered(void* dst, size_t n) {
  auto* ra = static_cast<ReadAhead*>(gnutls_transport_get_ptr(session_));
  if (gnutls_record_check_pending(session_) == 0 && ra->pos == ra->end) return kAgain;
  ra->buffered_only = true;
  const ssize_t got = recv(dst, n);
  ra->buffered_only = false;
  return got;
}

ssize_t TlsSession::send(const void* src, size_t n) {
  return result(static_cast<int>(gnutls_record_send(session_, src, n)));
}

bool TlsSession::wants_write() const { return gnutls_record_get_direction(session_) == 1; }

void TlsSession::bye() { gnutls_bye(session_, GNUTLS_SHUT_WR); }

// ---- TlsTransport ----

TlsTransport::TlsTransport(TlsSession& session, int fd, int send_timeout_ms)
    : session_(session), fd_(fd) {
  make_blocking_with_send_timeout(fd_, send_timeout_ms);
}

// A record holds what the client sent in one write, often a single request
// header. Records already received are decrypted into the same call, so one
// receive still yields many requests (and one thread runs them as a batch)
// as it does on a plain socket.
ssize_t TlsTransport::recv_some(void* dst, size_t n) {
  for (;;) {
    const ssize_t got = session_.recv(dst, n);
    if (got > 0) {
      const auto first = static_cast<size_t>(got);
      return static_cast<ssize_t>(first + recv_buffered(dst, first, n));
    }
    if (got == 0) return 0;
    if (got == TlsSession::kFailed) {
      errno = EPROTO;
      return -1;
    }
    pollfd p{fd_, POLLIN, 0};  // kAgain on a blocking socket: a signal, or a spurious wake
    if (::poll(&p, 1, -1) < 0 && errno != EINTR) return -1;
  }
}

// An end of stream or a failure met here is met again by the next receive,
// which reports it.
size_t TlsTransport::recv_buffered(void* dst, size_t have, size_t n) {
  auto* out = static_cast<uint8_t*>(dst);
  size_t more = 0;
  while (have + more < n) {
    const ssize_t got = session_.recv_buffered(out + have + more, n - have - more);
    if (got <= 0) break;
    more += static_cast<size_t>(got);
  }
  return more;
}

namespace {

// Flushes the cork buffer. A socket that cannot take the bytes within the
// send timeout (EAGAIN) fails the send, as on a plain socket.
bool uncork(gnutls_session_t s) {
  do {
    const ssize_t rc = gnutls_record_uncork(s, 0);
    if (rc < 0 && rc != GNUTLS_E_INTERRUPTED) return false;
  } while (gnutls_record_check_corked(s) > 0);
  return true;
}

}  // namespace

bool TlsTransport::send_all(std::span<iovec> iov) {
  gnutls_session_t s = session_.get();
  gnutls_record_cork(s);
  for (const iovec& v : iov) {
    const auto* p = static_cast<const uint8_t*>(v.iov_base);
    size_t left = v.iov_len;
    if (left > kCorkedMax) {
      if (!uncork(s)) return false;
    }
    while (left > 0) {
      const ssize_t n = gnutls_record_send(s, p, left);
      if (n == GNUTLS_E_INTERRUPTED) continue;
      if (n <= 0) return false;
      p += n;
      left -= static_cast<size_t>(n);
    }
    if (v.iov_len > kCorkedMax) gnutls_record_cork(s);
  }
  return uncork(s);
}

void TlsTransport::shutdown(int how) { ::shutdown(fd_, how); }

}  // namespace strata
