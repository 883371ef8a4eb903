// The export registry: every configured export opened once at start-up and
// shared by all connections (so flushes and writes are seen by every client,
// which is what CAN_MULTI_CONN promises).
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

class ExportRegistry final : public nbd::ExportCatalog {
 public:
  // Opens every export; throws ImageError/ConfigError naming the export.
  explicit ExportRegistry(const std::vector<ExportConfig>& configs);

  const nbd::ExportView* find(std::string_view name) const override;
  std::vector<const nbd::ExportView*> all() const override;
  Export* by_view(const nbd::ExportView* view);
  std::vector<std::unique_ptr<Export>>& exports() { return exports_; }

 private:
  std::vector<std::unique_ptr<Export>> exports_;
};

// Transmission flags that tell the truth about a device.
uint16_t transmission_flags(const Capabilities& caps);

// The dirty bitmaps export `cfg` offers: every exportable bitmap of `device`
// when cfg.bitmaps is unset, else cfg.bitmaps in its order. Throws
// ConfigError naming the export and the first listed bitmap the device does
// not have.
std::vector<std::string> exported_bitmaps(const ExportConfig& cfg, const BlockDevice& device);

}  // namespace strata
