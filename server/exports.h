// The export registry: every configured export opened once and shared by all
// connections (so flushes and writes are seen by every client, which is what
// CAN_MULTI_CONN promises).
//
// The registry belongs to the network thread: handshakes look exports up in
// it and a reload (Server::reload) replaces its list there. An Export is held
// by shared_ptr: a connection that chose it keeps it (and its open image)
// alive after a reload took it out of the registry, until that connection
// has drained and closed.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "formats/block_device.h"
#include "protocol/handshake.h"
#include "server/metrics.h"

namespace strata {

struct Export {
  ExportConfig config;
  std::shared_ptr<BlockDevice> device;
  Capabilities caps;
  nbd::ExportView view;
  // Request buffers of this export: aligned for direct I/O under cache none
  // (server/io_buffer.h), else 0.
  size_t buffer_alignment = 0;
  // Counters of this export's requests; made with the export, wherever it is
  // opened, and gone with it.
  std::shared_ptr<ExportMetrics> metrics = std::make_shared<ExportMetrics>();
};

// Opens the image of export `cfg` and describes it; throws ImageError
// (ImageInUseError when a lock stops it) or ConfigError naming the export.
// `options` defaults to cfg.open_options().
std::shared_ptr<Export> open_export(const ExportConfig& cfg);
std::shared_ptr<Export> open_export(const ExportConfig& cfg, const OpenOptions& options);
// The log line of an export that starts serving.
void log_opened(const Export& e);

class ExportRegistry final : public nbd::ExportCatalog {
 public:
  // Opens every export; throws ImageError/ConfigError naming the export.
  explicit ExportRegistry(const std::vector<ExportConfig>& configs);

  const nbd::ExportView* find(std::string_view name) const override;
  std::vector<const nbd::ExportView*> all() const override;
  std::shared_ptr<Export> by_view(const nbd::ExportView* view) const;
  std::shared_ptr<Export> by_name(std::string_view name) const;
  // In config order: the first is the default export.
  const std::vector<std::shared_ptr<Export>>& exports() const { return exports_; }
  // What a reload commits: the new list, in the new config's order.
  void replace(std::vector<std::shared_ptr<Export>> exports) { exports_ = std::move(exports); }

 private:
  std::vector<std::shared_ptr<Export>> exports_;
};

// Transmission flags that tell the truth about a device.
uint16_t transmission_flags(const Capabilities& caps);

// The dirty bitmaps export `cfg` offers: every exportable bitmap of `device`
// when cfg.bitmaps is unset, else cfg.bitmaps in its order. Throws
// ConfigError naming the export and the first listed bitmap the device does
// not have.
std::vector<std::string> exported_bitmaps(const ExportConfig& cfg, const BlockDevice& device);

}  // namespace strata
