// Crash consistency, exhaustively: every write and sync the driver issues is
// journaled; the image is then rebuilt as it would be after a crash at every
// point of the journal and checked by reopening it:
//  - process crash (all writes before the point landed): the image opens with a
//    valid trailing footer, every operation followed by a completed flush reads
//    back, nothing else changed (in a differencing disk the parent still shows
//    through);
//  - power loss (additionally, any one write since the last sync is lost): the
//    image opens, and every operation flushed before that sync reads back.
#include <spdlog/spdlog.h>

#include <algorithm>

#include "formats/file.h"
#include "tests/support/forwarding_file.h"
#include "vhd_test_util.h"

using namespace vhdtest;

namespace {

struct JournalEntry {
  bool sync = false;
  uint64_t offset = 0;
  Bytes data;
};

// Records every write and sync, in order, to replay crashes at each point.
class JournalFile final : public ForwardingFile {
 public:
  JournalFile(std::unique_ptr<strata::File> inner, std::vector<JournalEntry>& log)
      : ForwardingFile(std::move(inner)), log_(log) {}
  int write_at(uint64_t off, std::span<const std::byte> buf) override {
    auto p = reinterpret_cast<const uint8_t*>(buf.data());
    log_.push_back({false, off, Bytes(p, p + buf.size())});
    return ForwardingFile::write_at(off, buf);
  }
  int sync() override {
    log_.push_back({true, 0, {}});
    return ForwardingFile::sync();
  }
  // No hole punching: every change of the image is a write the journal holds.
  int punch_hole(uint64_t, uint64_t) override { return ENOTSUP; }
  int zero_range(uint64_t, uint64_t) override { return ENOTSUP; }

 private:
  std::vector<JournalEntry>& log_;
};

struct Op {
  uint64_t offset = 0;
  Bytes before, after;        // content of the range before and after the operation
  size_t begin = 0, end = 0;  // journal entries [begin, end)
  size_t flushed = SIZE_MAX;  // journal position where a flush covering it completed
};

Bytes replay(const Bytes& initial, const std::vector<JournalEntry>& log, size_t upto,
             size_t skip = SIZE_MAX) {
  Bytes img = initial;
  for (size_t i = 0; i < upto; ++i) {
    const auto& e = log[i];
    if (e.sync || i == skip) continue;
    if (img.size() < e.offset + e.data.size()) img.resize(e.offset + e.data.size(), 0);
    std::copy(e.data.begin(), e.data.end(), img.begin() + static_cast<long>(e.offset));
  }
  return img;
}

void run_journal_test(bool differencing) {
  // Hundreds of reopened crash images each log their footer repair: keep quiet.
  struct Quiet {
    spdlog::level::level_enum old = spdlog::get_level();
    Quiet() { spdlog::set_level(spdlog::level::err); }
    ~Quiet() { spdlog::set_level(old); }
  } quiet;
  TempDir t;
  std::string base = t / "base.vhd", img = t / "img.vhd", replayed = t / "replay.vhd";
  constexpr uint64_t MiB = 1 << 20;
  Bytes start;  // guest content before the workload
  if (differencing) {
    create(base, "4M", {{"force_size", "on"}});
    {
      auto d = open(base);
      start = pattern(4 * MiB, 77);
      REQUIRE(write(*d, 0, start) == 0);
    }
    create(img, "", {{"block_size", "128K"}, {"locators", "w2ru"}}, std::string("base.vhd"));
  } else {
    create(img, "4M", {{"force_size", "on"}, {"block_size", "128K"}});
    start.assign(4 * MiB, 0);
  }
  const Bytes initial = file_bytes(img);

  std::vector<JournalEntry> log;
  std::vector<Op> ops;
  {
    strata::ChainContext ctx;
    ctx.options = opts();
    ctx.allowed_dirs = {fs::canonical(t.path).string()};
    auto dev = strata::open_vhd(
        std::make_unique<JournalFile>(strata::host_file_system()->open(img, true), log), ctx);
    REQUIRE(log.empty());
    std::mt19937 rng(differencing ? 21 : 12);
    // Disjoint 64 KiB slots, so each range is touched by one operation only;
    // two slots share a 128 KiB block, so later operations also update the
    // bitmap of an allocated block.
    std::vector<uint64_t> slots(64);
    for (size_t i = 0; i < slots.size(); ++i) slots[i] = i;
    std::shuffle(slots.begin(), slots.end(), rng);
    Bytes model = start;
    for (int i = 0; i < 28; ++i) {
      Op op;
      const uint64_t slot = slots[i] * 64 * 1024;
      size_t len = 1 + rng() % (i % 3 == 0 ? 700 : 60000);
      op.offset = slot + rng() % (64 * 1024 - len);
      op.before.assign(model.begin() + static_cast<long>(op.offset),
                       model.begin() + static_cast<long>(op.offset + len));
      op.begin = log.size();
      if (i % 7 == 6) {
        REQUIRE(dev->write_zeroes(op.offset, len, {}) == 0);
        op.after.assign(len, 0);
      } else {
        op.after = pattern(len, rng());
        REQUIRE(write(*dev, op.offset, op.after) == 0);
      }
      if (i % 4 == 3) REQUIRE(dev->flush() == 0);
      op.end = log.size();
      std::copy(op.after.begin(), op.after.end(), model.begin() + static_cast<long>(op.offset));
      ops.push_back(std::move(op));
      if (i % 4 == 3) {
        for (auto& o : ops) o.flushed = std::min(o.flushed, log.size());
      }
    }
  }
  // Closing the device flushes what is pending.
  for (auto& o : ops) o.flushed = std::min(o.flushed, log.size());
  INFO("journal entries: ", log.size());
  REQUIRE(log.size() > 50);

  auto check_image = [&](const Bytes& bytes, size_t upto, size_t durable_upto, bool strict) {
    write_file(replayed, bytes);
    std::shared_ptr<strata::BlockDevice> d;
    try {
      d = open(replayed, true);
    } catch (const std::exception& e) {
      FAIL("crash point ", upto, ": image does not open: ", std::string(e.what()));
      return;
    }
    if (strict) {
      strata::vhd::Footer f;
      CHECK(strata::vhd::parse_footer(bytes.data() + bytes.size() - 512, f) == "");
    }
    Bytes got = read_all(*d);
    Bytes want = start;
    std::vector<bool> unknown(want.size() / 512 + 1, false);
    for (const auto& op : ops) {
      const bool done = op.flushed <= (strict ? upto : durable_upto);
      const bool untouched = op.begin >= upto;
      if (done) {
        std::copy(op.after.begin(), op.after.end(), want.begin() + static_cast<long>(op.offset));
      } else if (!untouched) {
        // In progress or not flushed: each sector holds the old or the new
        // content, never anything else (zeros, or a parent hidden by a bit set
        // before its data).
        for (uint64_t p = op.offset; p < op.offset + op.after.size();) {
          uint64_t q = std::min<uint64_t>((p / 512 + 1) * 512, op.offset + op.after.size());
          auto g = got.begin() + static_cast<long>(p);
          auto o = op.before.begin() + static_cast<long>(p - op.offset);
          auto a = op.after.begin() + static_cast<long>(p - op.offset);
          bool ok = std::equal(g, g + static_cast<long>(q - p), o) ||
                    std::equal(g, g + static_cast<long>(q - p), a);
          if (!ok) {
            INFO("crash point ", upto, std::string(strict ? " (process crash)" : " (power loss)"),
                 ": torn sector at ", p);
            CHECK(ok);
          }
          std::copy(g, g + static_cast<long>(q - p), want.begin() + static_cast<long>(p));
          p = q;
        }
      }
    }
    INFO("crash point ", upto, std::string(strict ? " (process crash)" : " (power loss)"));
    CHECK(got == want);
  };

  size_t last_sync = 0;
  for (size_t k = 0; k <= log.size(); ++k) {
    check_image(replay(initial, log, k), k, k, true);
    for (size_t w = last_sync; w < k; ++w) {
      if (!log[w].sync) check_image(replay(initial, log, k, w), k, last_sync, false);
    }
    if (k < log.size() && log[k].sync) last_sync = k + 1;
  }
}

}  // namespace

TEST_CASE("crash at every journal point of a dynamic disk") { run_journal_test(false); }

TEST_CASE("crash at every journal point of a differencing disk") { run_journal_test(true); }
