/*
 * console: UEFI 2.10 sections 12.3 (Simple Text Input) and 12.4 (Simple Text Output)
 * through SystemTable->ConIn / ConOut / StdErr.
 */
#include "lib.h"

EFI_STATUS EFIAPI efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *systab)
{
    EFI_STATUS st;
    lib_init(image, systab);
    EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL *out = gST->ConOut;
    EFI_SIMPLE_TEXT_INPUT_PROTOCOL *in = gST->ConIn;

    st = out->OutputString(out, L"console: simple text input/output\r\n");
    CHECK_ST("conout-output-string", st, EFI_SUCCESS);
    CHECK_ST("conout-test-string", out->TestString(out, L"plain ASCII text"), EFI_SUCCESS);

    SIMPLE_TEXT_OUTPUT_MODE *m = out->Mode;
    if (!CHECK("conout-mode-pointer", m != NULL))
        return finish();
    CHECK("conout-mode-maxmode", m->MaxMode >= 1);
    CHECK("conout-mode-current", m->Mode >= 0 && m->Mode < m->MaxMode);
    CHECK("conout-mode-attribute", m->Attribute >= 0 && m->Attribute <= 0x7F);
    CHECK("conout-mode-cursor", m->CursorColumn >= 0 && m->CursorRow >= 0);

    UINTN cols = 0, rows = 0;
    st = out->QueryMode(out, 0, &cols, &rows);
    CHECK_ST("query-mode-0", st, EFI_SUCCESS);
    if (cols == 80 && rows == 25)
        pass("query-mode-0-80x25");
    else
        fail("query-mode-0-80x25", "mode 0 is %ux%u", (UINT64)cols, (UINT64)rows);
    st = out->QueryMode(out, (UINTN)m->MaxMode, &cols, &rows);
    CHECK_ST("query-mode-invalid", st, EFI_UNSUPPORTED);

    st = out->SetMode(out, 0);
    CHECK_ST("set-mode-0", st, EFI_SUCCESS);
    CHECK_EQ("set-mode-0-current", m->Mode, 0);
    st = out->SetMode(out, (UINTN)m->MaxMode);
    CHECK_ST("set-mode-invalid", st, EFI_UNSUPPORTED);

    st = out->SetAttribute(out, EFI_TEXT_ATTR(EFI_WHITE, EFI_BACKGROUND_BLUE >> 4));
    CHECK_ST("set-attribute", st, EFI_SUCCESS);
    CHECK_EQ("set-attribute-mode", m->Attribute, 0x1F);
    st = out->SetAttribute(out, EFI_TEXT_ATTR(EFI_LIGHTGRAY, EFI_BLACK));
    CHECK("set-attribute-restore", st == EFI_SUCCESS && m->Attribute == 0x07);

    /* ClearScreen leaves the cursor at (0,0): sample it before any printing moves it */
    EFI_STATUS st_clear = out->ClearScreen(out);
    INT32 c0 = m->CursorColumn, r0 = m->CursorRow;
    st = out->SetCursorPosition(out, 5, 3);
    INT32 c1 = m->CursorColumn, r1 = m->CursorRow;
    EFI_STATUS st_bad = out->SetCursorPosition(out, 80, 0);   /* column == 80 is past the end */
    EFI_STATUS st_bad_row = out->SetCursorPosition(out, 0, 25);
    out->SetCursorPosition(out, 0, 4);
    say("\n");
    CHECK_ST("clear-screen", st_clear, EFI_SUCCESS);
    CHECK("clear-screen-cursor-home", c0 == 0 && r0 == 0);
    CHECK_ST("set-cursor-position", st, EFI_SUCCESS);
    CHECK("set-cursor-position-mode", c1 == 5 && r1 == 3);
    CHECK_ST("set-cursor-position-bad-column", st_bad, EFI_UNSUPPORTED);
    CHECK_ST("set-cursor-position-bad-row", st_bad_row, EFI_UNSUPPORTED);

    st = out->EnableCursor(out, FALSE);
    if (st == EFI_SUCCESS)
        CHECK("enable-cursor-off", m->CursorVisible == FALSE);
    else
        CHECK_ST("enable-cursor-off", st, EFI_UNSUPPORTED);   /* allowed by the spec */
    st = out->EnableCursor(out, TRUE);
    if (st == EFI_SUCCESS)
        CHECK("enable-cursor-on", m->CursorVisible == TRUE);
    else
        CHECK_ST("enable-cursor-on", st, EFI_UNSUPPORTED);

    st = out->Reset(out, FALSE);
    CHECK_ST("conout-reset", st, EFI_SUCCESS);
    CHECK_ST("stderr-output-string", gST->StdErr->OutputString(gST->StdErr, L"console: stderr line\r\n"),
             EFI_SUCCESS);

    if (CHECK("conin-present", in != NULL)) {
        CHECK_ST("conin-reset", in->Reset(in, FALSE), EFI_SUCCESS);
        EFI_INPUT_KEY key = {0, 0};
        st = in->ReadKeyStroke(in, &key);
        CHECK_ST("conin-read-key-not-ready", st, EFI_NOT_READY);
        CHECK("conin-wait-for-key-event", in->WaitForKey != NULL);
        if (in->WaitForKey)
            CHECK_ST("conin-wait-for-key-not-ready", gBS->CheckEvent(in->WaitForKey), EFI_NOT_READY);
    }
    return finish();
}
