#include "server/exports.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "formats/direct_file.h"
#include "formats/errors.h"
#include "formats/open.h"

namespace strata {

uint16_t transmission_flags(const Capabilities& caps) {
  uint16_t f = nbd::kTxHasFlags;
  if (caps.read_only) f |= nbd::kTxReadOnly;
  if (caps.can_flush) f |= nbd::kTxSendFlush;
  if (caps.can_fua && !caps.read_only) f |= nbd::kTxSendFua;
  if (caps.can_trim && !caps.read_only) f |= nbd::kTxSendTrim;
  if (caps.can_zero && !caps.read_only) {
    f |= nbd::kTxSendWriteZeroes;
    if (caps.can_fast_zero) f |= nbd::kTxSendFastZero;
  }
  if (caps.can_multi_conn) f |= nbd::kTxCanMultiConn;
  if (caps.can_cache) f |= nbd::kTxSendCache;
  return f;
}

std::vector<std::string> exported_bitmaps(const ExportConfig& cfg, const BlockDevice& device) {
  std::vector<std::string> available = device.dirty_bitmaps();
  if (!cfg.bitmaps) return available;
  for (const std::string& name : *cfg.bitmaps) {
    if (std::find(available.begin(), available.end(), name) != available.end()) continue;
    std::string has;
    for (const std::string& a : available) has += (has.empty() ? "'" : ", '") + a + "'";
    throw ConfigError("export '" + cfg.name + "': bitmap '" + name + "' is not an exportable " +
                      "dirty bitmap of " + cfg.path + " (" +
                      (has.empty() ? std::string("it has none") : "it has " + has) + ")");
  }
  return *cfg.bitmaps;
}

std::shared_ptr<Export> open_export(const ExportConfig& cfg) {
  return open_export(cfg, cfg.open_options());
}

std::shared_ptr<Export> open_export(const ExportConfig& cfg, const OpenOptions& options) {
  auto e = std::make_shared<Export>();
  e->config = cfg;
  try {
    e->device = open_image(cfg.path, options);
  } catch (const ImageInUseError& err) {
    throw ImageInUseError("export '" + cfg.name + "': " + err.what());
  } catch (const ImageError& err) {
    throw ImageError("export '" + cfg.name + "': " + err.what());
  }
  e->caps = e->device->capabilities();
  if (cfg.cache == "none") e->buffer_alignment = kDirectIoBufferAlignment;
  if (cfg.read_only) e->caps.read_only = true;
  BlockSizes bs = e->device->block_sizes();
  e->view.name = cfg.name;
  e->view.description = cfg.description;
  e->view.size = e->device->size();
  e->view.tx_flags = transmission_flags(e->caps);
  e->view.min_block = std::max<uint32_t>(bs.minimum, 1);
  e->view.pref_block = std::max(bs.preferred, e->view.min_block);
  e->view.max_block = std::min<uint32_t>(bs.maximum, kMaxRequestBytes);
  e->view.tls_required = cfg.tls_required;
  e->view.allow = cfg.allow;
  e->view.bitmaps = exported_bitmaps(cfg, *e->device);
  return e;
}

void log_opened(const Export& e) {
  std::string bitmaps;
  for (const std::string& b : e.view.bitmaps) bitmaps += (bitmaps.empty() ? "" : ", ") + b;
  spdlog::info("export '{}': {} {} ({} bytes){}{}", e.config.name, e.device->format(),
               e.config.path, e.view.size, e.caps.read_only ? ", read-only" : "",
               bitmaps.empty() ? "" : ", dirty bitmaps: " + bitmaps);
}

ExportRegistry::ExportRegistry(const std::vector<ExportConfig>& configs) {
  for (const auto& cfg : configs) {
    exports_.push_back(open_export(cfg));
    log_opened(*exports_.back());
  }
}

const nbd::ExportView* ExportRegistry::find(std::string_view name) const {
  if (name.empty() && !exports_.empty()) return &exports_.front()->view;  // default export
  for (const auto& e : exports_) {
    if (e->view.name == name) return &e->view;
  }
  return nullptr;
}

std::vector<const nbd::ExportView*> ExportRegistry::all() const {
  std::vector<const nbd::ExportView*> out;
  for (const auto& e : exports_) out.push_back(&e->view);
  return out;
}

std::shared_ptr<Export> ExportRegistry::by_view(const nbd::ExportView* view) const {
  for (const auto& e : exports_) {
    if (&e->view == view) return e;
  }
  return nullptr;
}

std::shared_ptr<Export> ExportRegistry::by_name(std::string_view name) const {
  for (const auto& e : exports_) {
    if (e->config.name == name) return e;
  }
  return nullptr;
}

}  // namespace strata
