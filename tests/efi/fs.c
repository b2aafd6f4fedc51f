/*
 * fs: the volume the image was loaded from, through EFI_SIMPLE_FILE_SYSTEM_PROTOCOL and
 * EFI_FILE_PROTOCOL (UEFI 2.10 sections 13.4, 13.5), the way systemd-stub finds its sidecars:
 * LoadedImage->DeviceHandle -> OpenVolume -> Open/Read/GetInfo.
 *
 * Expects a read-only volume laid out as tests/e2e/test_esp.py makes it:
 *   \hello.txt            "hello from the ESP\n"
 *   \EFI\BOOT\fs.efi      this app (LoadedImage->FilePath must be \EFI\BOOT\fs.efi)
 *   \link-in              symlink to hello.txt (inside the volume: allowed)
 *   \link-out             symlink to a file outside the volume (refused)
 *   \fifo                 a FIFO (refused, never opened)
 *   ..\outside.txt        (next to the volume folder) a secret starting "SECRET"
 * Every jail attempt must fail and must not yield the secret; the status is printed (vmrun
 * answers EFI_ACCESS_DENIED, which the pytest side checks).
 */
#include "lib.h"

_Static_assert(__builtin_offsetof(EFI_FILE_INFO, FileName) == 80, "SIZE_OF_EFI_FILE_INFO");
_Static_assert(__builtin_offsetof(EFI_FILE_SYSTEM_INFO, VolumeLabel) == 36, "SIZE_OF_EFI_FILE_SYSTEM_INFO");

static EFI_GUID li_guid = EFI_LOADED_IMAGE_PROTOCOL_GUID;
static EFI_GUID dp_guid = EFI_DEVICE_PATH_PROTOCOL_GUID;
static EFI_GUID sfs_guid = EFI_SIMPLE_FILE_SYSTEM_PROTOCOL_GUID;
static EFI_GUID file_info_guid = EFI_FILE_INFO_ID;
static EFI_GUID fs_info_guid = EFI_FILE_SYSTEM_INFO_ID;
static EFI_GUID label_guid = EFI_FILE_SYSTEM_VOLUME_LABEL_ID;
static EFI_GUID bogus_guid = {0x0badc0de, 0x1111, 0x2222, {0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa}};

static const char hello[] = "hello from the ESP\n";
#define HELLO_LEN (sizeof(hello) - 1)

static UINT8 buf[4096] __attribute__((aligned(8)));
static UINT8 buf2[4096] __attribute__((aligned(8)));

static EFI_FILE_PROTOCOL *root;

static int contains_secret(const UINT8 *p, UINTN n)
{
    for (UINTN i = 0; i + 6 <= n; i++)
        if (memcmp(p + i, "SECRET", 6) == 0)
            return 1;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */

static EFI_HANDLE test_loaded_image(void)
{
    EFI_LOADED_IMAGE_PROTOCOL *li = NULL;
    EFI_STATUS st = gBS->HandleProtocol(gImage, &li_guid, (VOID **)&li);
    if (!CHECK("fs-loaded-image", st == EFI_SUCCESS && li != NULL))
        return NULL;
    CHECK("fs-device-handle", li->DeviceHandle != NULL);

    /* FilePath: one File Path media node (type 4, sub-type 4) naming this app */
    EFI_DEVICE_PATH_PROTOCOL *fp = li->FilePath;
    if (CHECK("fs-file-path-node", fp != NULL && fp->Type == 4 && fp->SubType == 4)) {
        CHAR16 *name = (CHAR16 *)(fp + 1);
        say("fs: file path %S\n", name);
        CHECK("fs-file-path", streq16(name, L"\\EFI\\BOOT\\fs.efi"));
        CHECK("fs-file-path-end", dp_is_end(dp_next(fp)));
    }

    /* the device: .../HD(1,GPT,...) as the last node */
    EFI_DEVICE_PATH_PROTOCOL *dp = NULL, *last = NULL;
    st = gBS->HandleProtocol(li->DeviceHandle, &dp_guid, (VOID **)&dp);
    if (CHECK("fs-device-path", st == EFI_SUCCESS && dp != NULL)) {
        for (int i = 0; i < 16 && !dp_is_end(dp); i++) {
            last = dp;
            dp = dp_next(dp);
        }
        int hd = last && last->Type == 4 && last->SubType == 1 && dp_node_len(last) == 42;
        if (CHECK("fs-device-path-hd", hd)) {
            UINT8 *d = (UINT8 *)last + 4;
            UINT32 part;
            UINT64 start, size;
            memcpy(&part, d, 4);
            memcpy(&start, d + 4, 8);
            memcpy(&size, d + 12, 8);
            say("fs: partition %u start %x size %x\n", (UINT64)part, start, size);
            CHECK("fs-device-path-gpt", part == 1 && d[36] == 2 && d[37] == 2 && size > 0);
        }
    }
    return li->DeviceHandle;
}

static void test_volume(EFI_HANDLE dev)
{
    EFI_SIMPLE_FILE_SYSTEM_PROTOCOL *sfs = NULL;
    EFI_STATUS st = gBS->HandleProtocol(dev, &sfs_guid, (VOID **)&sfs);
    if (!CHECK("fs-sfs", st == EFI_SUCCESS && sfs != NULL))
        return;
    CHECK("fs-sfs-revision", sfs->Revision >= 0x00010000);
    st = sfs->OpenVolume(sfs, &root);
    if (!CHECK("fs-open-volume", st == EFI_SUCCESS && root != NULL))
        root = NULL;
    else
        CHECK("fs-file-revision", root->Revision >= 0x00010000);
}

static void test_root_info(void)
{
    UINTN size = 0;
    EFI_STATUS st = root->GetInfo(root, &file_info_guid, &size, NULL);
    CHECK_ST("fs-root-info-probe", st, EFI_BUFFER_TOO_SMALL);
    CHECK("fs-root-info-probe-size", size >= 82 && size <= sizeof(buf));
    size = sizeof(buf);
    st = root->GetInfo(root, &file_info_guid, &size, buf);
    EFI_FILE_INFO *info = (EFI_FILE_INFO *)buf;
    if (CHECK_ST("fs-root-info", st, EFI_SUCCESS))
        CHECK("fs-root-info-directory", (info->Attribute & EFI_FILE_DIRECTORY) != 0);
}

static void test_read_hello(void)
{
    EFI_FILE_PROTOCOL *f = NULL;
    EFI_STATUS st = root->Open(root, &f, L"\\hello.txt", EFI_FILE_MODE_READ, 0);
    if (!CHECK_ST("fs-open-hello", st, EFI_SUCCESS))
        return;
    UINTN size = sizeof(buf);
    st = f->Read(f, &size, buf);
    CHECK("fs-read-hello", st == EFI_SUCCESS && size == HELLO_LEN && memcmp(buf, hello, HELLO_LEN) == 0);
    size = sizeof(buf);
    st = f->Read(f, &size, buf);
    CHECK("fs-read-at-eof", st == EFI_SUCCESS && size == 0);
    UINT64 pos = 0;
    st = f->GetPosition(f, &pos);
    CHECK("fs-get-position", st == EFI_SUCCESS && pos == HELLO_LEN);
    st = f->SetPosition(f, 6);
    size = 4;
    EFI_STATUS st2 = f->Read(f, &size, buf);
    CHECK("fs-set-position-read", st == EFI_SUCCESS && st2 == EFI_SUCCESS && size == 4 &&
          memcmp(buf, "from", 4) == 0);
    st = f->SetPosition(f, 0xFFFFFFFFFFFFFFFFULL);
    f->GetPosition(f, &pos);
    CHECK("fs-set-position-end", st == EFI_SUCCESS && pos == HELLO_LEN);
    st = f->SetPosition(f, 100);
    size = 8;
    st2 = f->Read(f, &size, buf);
    CHECK("fs-position-beyond-eof", st == EFI_SUCCESS && st2 == EFI_DEVICE_ERROR);

    /* EFI_FILE_INFO */
    size = 10;
    st = f->GetInfo(f, &file_info_guid, &size, buf);
    CHECK("fs-info-too-small", st == EFI_BUFFER_TOO_SMALL && size == 80 + sizeof(L"hello.txt"));
    size = sizeof(buf);
    st = f->GetInfo(f, &file_info_guid, &size, buf);
    EFI_FILE_INFO *info = (EFI_FILE_INFO *)buf;
    if (CHECK_ST("fs-info", st, EFI_SUCCESS)) {
        CHECK_EQ("fs-info-size", info->Size, 80 + sizeof(L"hello.txt"));
        CHECK_EQ("fs-info-file-size", info->FileSize, HELLO_LEN);
        CHECK("fs-info-physical-size", info->PhysicalSize >= HELLO_LEN);
        CHECK("fs-info-not-directory", (info->Attribute & EFI_FILE_DIRECTORY) == 0);
        CHECK("fs-info-read-only", (info->Attribute & EFI_FILE_READ_ONLY) != 0);
        CHECK("fs-info-name", streq16(info->FileName, L"hello.txt"));
        EFI_TIME *t = &info->ModificationTime;
        CHECK("fs-info-mtime", t->Year >= 2020 && t->Year <= 9999 && t->Month >= 1 && t->Month <= 12 &&
              t->Day >= 1 && t->Day <= 31 && t->Hour < 24 && t->Minute < 60 && t->Second < 60 &&
              t->Nanosecond < 1000000000);
    }
    size = sizeof(buf);
    CHECK_ST("fs-info-unknown-type", f->GetInfo(f, &bogus_guid, &size, buf), EFI_UNSUPPORTED);

    /* read-only volume: no writing through a handle opened for reading */
    size = 3;
    CHECK_ST("fs-write-protected", f->Write(f, &size, (VOID *)"abc"), EFI_WRITE_PROTECTED);
    CHECK_ST("fs-flush-protected", f->Flush(f), EFI_WRITE_PROTECTED);
    CHECK_ST("fs-close", f->Close(f), EFI_SUCCESS);
}

static void test_open_variants(void)
{
    EFI_FILE_PROTOCOL *f = NULL, *dir = NULL;
    UINTN size;
    EFI_STATUS st = root->Open(root, &f, L"\\HELLO.TXT", EFI_FILE_MODE_READ, 0);
    if (CHECK_ST("fs-open-case-insensitive", st, EFI_SUCCESS)) {
        size = sizeof(buf);
        st = f->Read(f, &size, buf);
        CHECK("fs-read-case-insensitive", st == EFI_SUCCESS && size == HELLO_LEN &&
              memcmp(buf, hello, HELLO_LEN) == 0);
        f->Close(f);
    }
    st = root->Open(root, &dir, L"efi\\Boot", EFI_FILE_MODE_READ, 0);
    if (CHECK_ST("fs-open-dir-relative", st, EFI_SUCCESS)) {
        f = NULL;
        st = dir->Open(dir, &f, L"FS.EFI", EFI_FILE_MODE_READ, 0);
        if (CHECK_ST("fs-open-in-dir", st, EFI_SUCCESS)) {
            size = 2;
            st = f->Read(f, &size, buf);
            CHECK("fs-read-self-mz", st == EFI_SUCCESS && size == 2 && buf[0] == 'M' && buf[1] == 'Z');
            f->Close(f);
        }
        f = NULL;
        st = dir->Open(dir, &f, L"..\\.\\..\\hello.txt", EFI_FILE_MODE_READ, 0);
        CHECK_ST("fs-open-dotdot-inside", st, EFI_SUCCESS);
        if (f)
            f->Close(f);
        f = NULL;
        st = dir->Open(dir, &f, L"\\hello.txt", EFI_FILE_MODE_READ, 0);
        CHECK_ST("fs-open-absolute-from-dir", st, EFI_SUCCESS);
        if (f)
            f->Close(f);
        dir->Close(dir);
    }
    f = NULL;
    st = root->Open(root, &f, L"\\link-in", EFI_FILE_MODE_READ, 0);
    if (CHECK_ST("fs-open-link-inside", st, EFI_SUCCESS)) {
        size = sizeof(buf);
        st = f->Read(f, &size, buf);
        CHECK("fs-read-link-inside", st == EFI_SUCCESS && size == HELLO_LEN);
        f->Close(f);
    }
    f = NULL;
    CHECK_ST("fs-open-missing", root->Open(root, &f, L"\\nope.txt", EFI_FILE_MODE_READ, 0), EFI_NOT_FOUND);
    CHECK_ST("fs-open-file-as-dir", root->Open(root, &f, L"\\hello.txt\\x", EFI_FILE_MODE_READ, 0),
             EFI_NOT_FOUND);
    CHECK_ST("fs-open-empty-name", root->Open(root, &f, L"", EFI_FILE_MODE_READ, 0), EFI_INVALID_PARAMETER);
    CHECK_ST("fs-open-bad-mode", root->Open(root, &f, L"\\hello.txt", EFI_FILE_MODE_WRITE, 0),
             EFI_INVALID_PARAMETER);
    CHECK_ST("fs-open-write-protected",
             root->Open(root, &f, L"\\hello.txt", EFI_FILE_MODE_READ | EFI_FILE_MODE_WRITE, 0),
             EFI_WRITE_PROTECTED);
    CHECK_ST("fs-create-write-protected",
             root->Open(root, &f, L"\\new.txt",
                        EFI_FILE_MODE_READ | EFI_FILE_MODE_WRITE | EFI_FILE_MODE_CREATE, 0),
             EFI_WRITE_PROTECTED);
    CHECK_ST("fs-not-created", root->Open(root, &f, L"\\new.txt", EFI_FILE_MODE_READ, 0), EFI_NOT_FOUND);

    /* Delete always closes the handle; on a read-only volume it only warns */
    f = NULL;
    st = root->Open(root, &f, L"\\hello.txt", EFI_FILE_MODE_READ, 0);
    if (st == EFI_SUCCESS) {
        CHECK_ST("fs-delete-warns", f->Delete(f), EFI_WARN_DELETE_FAILURE);
        f = NULL;
        st = root->Open(root, &f, L"\\hello.txt", EFI_FILE_MODE_READ, 0);
        CHECK_ST("fs-delete-kept-file", st, EFI_SUCCESS);
        if (f)
            f->Close(f);
    }
}

static void test_list_root(void)
{
    EFI_FILE_PROTOCOL *dir = NULL;
    EFI_STATUS st = root->Open(root, &dir, L"\\", EFI_FILE_MODE_READ, 0);
    if (!CHECK_ST("fs-open-root-again", st, EFI_SUCCESS))
        return;
    int n = 0, seen_hello = 0, seen_efi = 0, seen_link_in = 0, seen_bad = 0, sizes_ok = 1;
    int probe_ok = 1, probed = 0;
    for (int guard = 0; guard < 64; guard++) {
        UINTN size = 0;
        if (!probed) {         /* first entry: a too-small buffer must not advance the position */
            probed = 1;
            size = 16;
            st = dir->Read(dir, &size, buf);
            if (st != EFI_BUFFER_TOO_SMALL || size <= 80)
                probe_ok = 0;
        }
        size = sizeof(buf);
        st = dir->Read(dir, &size, buf);
        if (st != EFI_SUCCESS || size == 0)
            break;
        EFI_FILE_INFO *info = (EFI_FILE_INFO *)buf;
        n++;
        if (info->Size != size || info->Size != 80 + 2 * (strlen16(info->FileName) + 1))
            sizes_ok = 0;
        say("fs: entry %S attr %x size %u\n", info->FileName, info->Attribute, info->FileSize);
        if (streq16(info->FileName, L"hello.txt"))
            seen_hello = 1;
        if (streq16(info->FileName, L"EFI") && (info->Attribute & EFI_FILE_DIRECTORY))
            seen_efi = 1;
        if (streq16(info->FileName, L"link-in"))
            seen_link_in = 1;
        if (streq16(info->FileName, L".") || streq16(info->FileName, L"..") ||
            streq16(info->FileName, L"link-out") || streq16(info->FileName, L"fifo"))
            seen_bad = 1;
    }
    CHECK_ST("fs-list-status", st, EFI_SUCCESS);
    CHECK("fs-list-probe-too-small", probe_ok);
    CHECK("fs-list-entry-sizes", sizes_ok);
    CHECK("fs-list-has-hello", seen_hello);
    CHECK("fs-list-has-efi-dir", seen_efi);
    CHECK("fs-list-has-link-in", seen_link_in);
    CHECK("fs-list-hides-refused-and-dots", !seen_bad);
    UINT64 pos;
    CHECK_ST("fs-dir-get-position", dir->GetPosition(dir, &pos), EFI_UNSUPPORTED);
    CHECK_ST("fs-dir-set-position-nonzero", dir->SetPosition(dir, 1), EFI_UNSUPPORTED);
    CHECK_ST("fs-dir-rewind", dir->SetPosition(dir, 0), EFI_SUCCESS);
    int again = 0;
    for (int guard = 0; guard < 64; guard++) {
        UINTN size = sizeof(buf);
        if (dir->Read(dir, &size, buf) != EFI_SUCCESS || size == 0)
            break;
        again++;
    }
    CHECK("fs-dir-rewind-same-count", again == n && n >= 3);
    dir->Close(dir);
}

static void test_fs_info(void)
{
    UINTN size = 0;
    EFI_STATUS st = root->GetInfo(root, &fs_info_guid, &size, NULL);
    CHECK("fs-fsinfo-probe", st == EFI_BUFFER_TOO_SMALL && size > 36);
    size = sizeof(buf);
    st = root->GetInfo(root, &fs_info_guid, &size, buf);
    EFI_FILE_SYSTEM_INFO *fi = (EFI_FILE_SYSTEM_INFO *)buf;
    if (!CHECK_ST("fs-fsinfo", st, EFI_SUCCESS))
        return;
    say("fs: label %S size %u free %u\n", fi->VolumeLabel, fi->VolumeSize, fi->FreeSpace);
    CHECK_EQ("fs-fsinfo-size", fi->Size, 36 + 2 * (strlen16(fi->VolumeLabel) + 1));
    CHECK("fs-fsinfo-read-only", fi->ReadOnly == 1);
    CHECK_EQ("fs-fsinfo-block-size", fi->BlockSize, 512);
    CHECK("fs-fsinfo-sizes", fi->VolumeSize > 0 && fi->FreeSpace <= fi->VolumeSize);
    size = 1;
    st = root->GetInfo(root, &label_guid, &size, buf2);
    CHECK("fs-label-probe", st == EFI_BUFFER_TOO_SMALL && size == 2 * (strlen16(fi->VolumeLabel) + 1));
    size = sizeof(buf2);
    st = root->GetInfo(root, &label_guid, &size, buf2);
    CHECK("fs-label", st == EFI_SUCCESS && streq16((CHAR16 *)buf2, fi->VolumeLabel));
    size = sizeof(buf2);
    CHECK_ST("fs-setinfo-protected", root->SetInfo(root, &label_guid, sizeof(L"X"), (VOID *)L"X"),
             EFI_WRITE_PROTECTED);
}

/* each must fail; if a handle comes back anyway, it must not give the secret */
static void jail(const char *name, EFI_FILE_PROTOCOL *from, CHAR16 *path)
{
    EFI_FILE_PROTOCOL *f = NULL;
    EFI_STATUS st = from->Open(from, &f, path, EFI_FILE_MODE_READ, 0);
    const char *sn = status_name(st);
    say("fs: jail %S -> %s\n", path, sn ? sn : "?");
    if (!EFI_ERROR(st)) {
        UINTN size = sizeof(buf2);
        int leaked = 0;
        if (f && f->Read(f, &size, buf2) == EFI_SUCCESS)
            leaked = contains_secret(buf2, size);
        if (f)
            f->Close(f);
        fail(name, "opened (%s)%s", sn ? sn : "?", leaked ? ", and read the secret" : "");
        return;
    }
    CHECK(name, f == NULL);
}

static void test_jail(void)
{
    jail("fs-jail-dotdot-relative", root, L"..\\outside.txt");
    jail("fs-jail-dotdot-absolute", root, L"\\..\\outside.txt");
    jail("fs-jail-dotdot-deep", root, L"\\EFI\\..\\..\\outside.txt");
    jail("fs-jail-symlink-out", root, L"\\link-out");
    jail("fs-jail-symlink-out-case", root, L"\\LINK-OUT");
    jail("fs-jail-fifo", root, L"\\fifo");
    jail("fs-jail-host-separator", root, L"EFI/../../outside.txt");
    EFI_FILE_PROTOCOL *dir = NULL;
    if (root->Open(root, &dir, L"\\EFI\\BOOT", EFI_FILE_MODE_READ, 0) == EFI_SUCCESS) {
        jail("fs-jail-dotdot-from-subdir", dir, L"..\\..\\..\\outside.txt");
        dir->Close(dir);
    }
}

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *st)
{
    lib_init(image, st);
    say("fs: Simple File System and File protocols on the boot volume\n");
    EFI_HANDLE dev = test_loaded_image();
    if (dev)
        test_volume(dev);
    if (root) {
        test_root_info();
        test_read_hello();
        test_open_variants();
        test_list_root();
        test_fs_info();
        test_jail();
        CHECK_ST("fs-close-root", root->Close(root), EFI_SUCCESS);
    }
    return finish();
}
