//! Dataset loaders on small folders built with the official naming of every format, the MoNuSeg
//! Aperio XML reader and polygon rasteriser against hand-listed masks, and the error cases (each
//! error must name the file and the problem).

mod common;

use common::cli::tmpdir;
use medfastsam::rng::Rng;
use medfastsam::train::datasets::{
    Dataset, Format, MaskSource, Split, binarize, parse_aperio_xml, rasterize_polygons,
};
use std::path::Path;

const W: u32 = 20;
const H: u32 = 16;

fn mkdirs(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
}

/// Image pixel values derived from a seed, so each test image is distinct and checkable.
fn pixel(seed: u32, x: u32, y: u32) -> [u8; 3] {
    [
        (x * 10 + seed) as u8,
        (y * 12 + seed * 3) as u8,
        (seed * 40 + x + y) as u8,
    ]
}

fn write_image(path: &Path, seed: u32, w: u32, h: u32) {
    mkdirs(path.parent().unwrap());
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(pixel(seed, x, y)))
        .save(path)
        .unwrap();
}

/// Expected foreground of the masks written by `write_mask`: a seed-dependent rectangle.
fn mask_fg(seed: u32, x: u32, y: u32) -> bool {
    let x0 = seed % 5;
    (x0..x0 + 7).contains(&x) && (2..9).contains(&y)
}

/// Grey mask: 255 in the rectangle, and elsewhere 127 in one pixel (background: the rule is > 127)
/// — except that the 128 in the rectangle's first pixel is foreground.
fn write_mask(path: &Path, seed: u32, w: u32, h: u32) {
    mkdirs(path.parent().unwrap());
    image::GrayImage::from_fn(w, h, |x, y| {
        let v = if mask_fg(seed, x, y) {
            if x == seed % 5 && y == 2 { 128 } else { 255 }
        } else if (x, y) == (w - 1, h - 1) {
            127
        } else {
            0
        };
        image::Luma([v])
    })
    .save(path)
    .unwrap();
}

fn expected_mask(seed: u32, w: u32, h: u32) -> Vec<u8> {
    let mut m = Vec::new();
    for y in 0..h {
        for x in 0..w {
            m.push(mask_fg(seed, x, y) as u8);
        }
    }
    m
}

fn expected_image(seed: u32, w: u32, h: u32) -> Vec<u8> {
    let mut d = Vec::new();
    for y in 0..h {
        for x in 0..w {
            d.extend(pixel(seed, x, y));
        }
    }
    d
}

fn ids(d: &Dataset) -> Vec<&str> {
    d.samples.iter().map(|s| s.id.as_str()).collect()
}

fn err_text<T: std::fmt::Debug>(r: medfastsam::Result<T>) -> String {
    r.unwrap_err().to_string()
}

fn assert_has(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "error {text:?} should mention {p:?}");
    }
}

// ---- ISIC-2018 -------------------------------------------------------------------------------

fn build_isic(root: &Path) {
    let sets = [
        ("Training", &["0000000", "0000001", "0000003"][..]),
        ("Validation", &["0000004"][..]),
        ("Test", &["0000012", "0000010"][..]),
    ];
    let mut seed = 1;
    for (part, ids) in sets {
        let input = root.join(format!("ISIC2018_Task1-2_{part}_Input"));
        let gt = root.join(format!("ISIC2018_Task1_{part}_GroundTruth"));
        for id in ids {
            write_image(&input.join(format!("ISIC_{id}.jpg")), seed, W, H);
            write_mask(&gt.join(format!("ISIC_{id}_segmentation.png")), seed, W, H);
            seed += 1;
        }
        std::fs::write(input.join("ATTRIBUTION.txt"), "x").unwrap();
        std::fs::write(input.join("LICENSE.txt"), "x").unwrap();
        std::fs::write(gt.join("LICENSE.txt"), "x").unwrap();
    }
}

#[test]
fn isic2018_splits_ids_and_loading() {
    let root = tmpdir("isic");
    build_isic(&root);
    let tr = Dataset::open(&root, Format::Isic2018, Split::Train).unwrap();
    assert_eq!(ids(&tr), ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"]);
    assert_eq!(tr.format, Format::Isic2018);
    assert_eq!(
        tr.samples[1].image,
        root.join("ISIC2018_Task1-2_Training_Input/ISIC_0000001.jpg")
    );
    assert_eq!(
        tr.samples[1].mask,
        MaskSource::Png(
            root.join("ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png")
        )
    );
    let va = Dataset::open(&root, Format::Isic2018, Split::Val).unwrap();
    assert_eq!(ids(&va), ["ISIC_0000004"]);
    let te = Dataset::open(&root, Format::Isic2018, Split::Test).unwrap();
    assert_eq!(ids(&te), ["ISIC_0000010", "ISIC_0000012"]);
    let all = Dataset::open(&root, Format::Isic2018, Split::All).unwrap();
    assert_eq!(all.len(), 6);
    // loading: the JPEG is lossy, so check the size and the mask exactly (seed of ISIC_0000001 is 2)
    let (img, mask) = tr.load(1).unwrap();
    assert_eq!(
        (img.width, img.height, img.data.len()),
        (W as usize, H as usize, (W * H * 3) as usize)
    );
    assert_eq!(mask, expected_mask(2, W, H));
    let e = err_text(tr.load(3));
    assert_has(&e, &["sample 3", "has 3"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn isic2018_errors() {
    let root = tmpdir("isic-err");
    build_isic(&root);
    // a split whose folders are absent
    std::fs::remove_dir_all(root.join("ISIC2018_Task1-2_Validation_Input")).unwrap();
    let e = err_text(Dataset::open(&root, Format::Isic2018, Split::Val));
    assert_has(
        &e,
        &[
            root.to_str().unwrap(),
            "ISIC2018_Task1-2_Validation_Input",
            "ISIC2018_Task1_Validation_GroundTruth/ISIC_0000000_segmentation.png",
        ],
    );
    // an image without its mask
    std::fs::remove_file(
        root.join("ISIC2018_Task1_Test_GroundTruth/ISIC_0000012_segmentation.png"),
    )
    .unwrap();
    let e = err_text(Dataset::open(&root, Format::Isic2018, Split::Test));
    assert_has(
        &e,
        &[
            "ISIC2018_Task1-2_Test_Input/ISIC_0000012.jpg",
            "without its mask",
            "ISIC2018_Task1_Test_GroundTruth/ISIC_0000012_segmentation.png",
        ],
    );
    // a mask of another size: the error names both files and both sizes
    write_mask(
        &root.join("ISIC2018_Task1_Training_GroundTruth/ISIC_0000003_segmentation.png"),
        3,
        W + 1,
        H,
    );
    let tr = Dataset::open(&root, Format::Isic2018, Split::Train).unwrap();
    let e = err_text(tr.load(2));
    assert_has(
        &e,
        &[
            "ISIC_0000003_segmentation.png",
            "21×16",
            "ISIC_0000003.jpg",
            "20×16",
        ],
    );
    // an unreadable (corrupt) image
    std::fs::write(
        root.join("ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg"),
        b"not a jpeg",
    )
    .unwrap();
    let e = err_text(tr.load(0));
    assert_has(&e, &["ISIC_0000000.jpg", "not a recognised image"]);
    // a corrupt mask
    std::fs::write(
        root.join("ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png"),
        b"\x89PNG\r\n\x1a\nxx",
    )
    .unwrap();
    let e = err_text(tr.load(1));
    assert_has(&e, &["ISIC_0000001_segmentation.png"]);
    // a folder without any ISIC layout
    let empty = tmpdir("isic-empty");
    let e = err_text(Dataset::open(&empty, Format::Isic2018, Split::Train));
    assert_has(
        &e,
        &[
            "no ISIC-2018 train",
            "expected e.g.",
            "ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg",
        ],
    );
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

// ---- PH2 -------------------------------------------------------------------------------------

fn build_ph2(root: &Path, cases: &[(&str, u32)]) {
    for &(id, seed) in cases {
        let dir = root.join("PH2 Dataset images").join(id);
        write_image(
            &dir.join(format!("{id}_Dermoscopic_Image/{id}.bmp")),
            seed,
            W,
            H,
        );
        write_mask(
            &dir.join(format!("{id}_lesion/{id}_lesion.bmp")),
            seed,
            W,
            H,
        );
        // PH2 also ships colour-class folders per case: ignored
        mkdirs(&dir.join(format!("{id}_roi")));
    }
    std::fs::write(root.join("PH2_dataset.txt"), "x").unwrap();
}

#[test]
fn ph2_all_samples_and_lossless_loading() {
    let root = tmpdir("ph2");
    build_ph2(&root, &[("IMD002", 2), ("IMD010", 10), ("IMD003", 3)]);
    for split in [Split::Test, Split::All, Split::Train] {
        let d = Dataset::open(&root, Format::Ph2, split).unwrap();
        assert_eq!(ids(&d), ["IMD002", "IMD003", "IMD010"]);
    }
    // the inner folder works too
    let d = Dataset::open(&root.join("PH2 Dataset images"), Format::Ph2, Split::All).unwrap();
    assert_eq!(d.len(), 3);
    let (img, mask) = d.load(2).unwrap();
    assert_eq!(img.data, expected_image(10, W, H));
    assert_eq!(mask, expected_mask(10, W, H));
    // a case without its lesion mask
    std::fs::remove_file(root.join("PH2 Dataset images/IMD003/IMD003_lesion/IMD003_lesion.bmp"))
        .unwrap();
    let e = err_text(Dataset::open(&root, Format::Ph2, Split::All));
    assert_has(
        &e,
        &[
            "IMD003/IMD003_Dermoscopic_Image/IMD003.bmp",
            "without its mask",
            "IMD003/IMD003_lesion/IMD003_lesion.bmp",
        ],
    );
    let empty = tmpdir("ph2-empty");
    let e = err_text(Dataset::open(&empty, Format::Ph2, Split::All));
    assert_has(
        &e,
        &[
            "no PH2 cases",
            "PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp",
        ],
    );
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

// ---- TNBC ------------------------------------------------------------------------------------

#[test]
fn tnbc_slides_in_natural_order() {
    let root = tmpdir("tnbc");
    let files = [
        ("01", "01_1", 1),
        ("01", "01_10", 2),
        ("01", "01_2", 3),
        ("02", "02_1", 4),
    ];
    for (k, name, seed) in files {
        write_image(&root.join(format!("Slide_{k}/{name}.png")), seed, W, H);
        write_mask(&root.join(format!("GT_{k}/{name}.png")), seed, W, H);
    }
    let d = Dataset::open(&root, Format::Tnbc, Split::Test).unwrap();
    assert_eq!(ids(&d), ["01_1", "01_2", "01_10", "02_1"]);
    assert_eq!(
        d.samples[2].mask,
        MaskSource::Png(root.join("GT_01/01_10.png"))
    );
    let (img, mask) = d.load(2).unwrap();
    assert_eq!(img.data, expected_image(2, W, H));
    assert_eq!(mask, expected_mask(2, W, H));
    std::fs::remove_file(root.join("GT_02/02_1.png")).unwrap();
    let e = err_text(Dataset::open(&root, Format::Tnbc, Split::All));
    assert_has(
        &e,
        &["Slide_02/02_1.png", "without its mask", "GT_02/02_1.png"],
    );
    let empty = tmpdir("tnbc-empty");
    let e = err_text(Dataset::open(&empty, Format::Tnbc, Split::All));
    assert_has(
        &e,
        &["no TNBC images", "Slide_01/01_1.png", "GT_01/01_1.png"],
    );
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

// ---- MoNuSeg ---------------------------------------------------------------------------------

/// An Aperio XML file shaped like MoNuSeg's, with the given polygons.
fn aperio_xml(polys: &[&[(f64, f64)]]) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Annotations MicronsPerPixel=\"0.252000\">\n\
         <Annotation Id=\"1\" Name=\"\" ReadOnly=\"0\" Type=\"4\" LineColor=\"65280\" Visible=\"1\">\n\
         <Attributes>\n<Attribute Name=\"Description\" Id=\"0\" Value=\"\"/>\n</Attributes>\n<Regions>\n\
         <RegionAttributeHeaders>\n<AttributeHeader Id=\"9999\" Name=\"Region\" ColumnWidth=\"-1\"/>\n\
         </RegionAttributeHeaders>\n<!-- a comment with <Vertex X=\"1\" Y=\"1\"/> inside -->\n",
    );
    for (i, p) in polys.iter().enumerate() {
        s += &format!(
            "<Region Id=\"{}\" Type=\"0\" Zoom=\"0.042\" Selected=\"0\" ImageLocation=\"\" Length=\"95.1\" Area=\"612.3\" Text=\"\" DisplayId=\"{}\">\n<Attributes/>\n<Vertices>\n",
            i + 1,
            i + 1
        );
        for (x, y) in p.iter() {
            s += &format!("<Vertex X=\"{x:.6}\" Y=\"{y:.6}\" Z=\"0\"/>\n");
        }
        s += "</Vertices>\n</Region>\n";
    }
    s += "</Regions>\n<Plots/>\n</Annotation>\n</Annotations>\n";
    s
}

/// Two nuclei of a 20×16 image: the rectangle with corners (2,1)-(6,4) covers the pixels with
/// centres in [2,6)×[1,4): x 2..=5, y 1..=3; the square (10.5,8.5)-(13.5,11.5) covers x 10..=12,
/// y 8..=10.
const NUCLEI: [&[(f64, f64)]; 2] = [
    &[(2.0, 1.0), (6.0, 1.0), (6.0, 4.0), (2.0, 4.0)],
    &[(10.5, 8.5), (13.5, 8.5), (13.5, 11.5), (10.5, 11.5)],
];

fn nuclei_mask() -> Vec<u8> {
    let mut m = vec![0u8; (W * H) as usize];
    for y in 0..H as usize {
        for x in 0..W as usize {
            if ((2..=5).contains(&x) && (1..=3).contains(&y))
                || ((10..=12).contains(&x) && (8..=10).contains(&y))
            {
                m[y * W as usize + x] = 1;
            }
        }
    }
    m
}

fn build_monuseg_train(dir: &Path, ids: &[&str]) {
    for (i, id) in ids.iter().enumerate() {
        write_image(&dir.join(format!("Tissue Images/{id}.tif")), i as u32, W, H);
        std::fs::write(
            dir.join(format!("Annotations/{id}.xml")),
            aperio_xml(&NUCLEI),
        )
        .unwrap();
    }
}

fn build_monuseg_test(dir: &Path, ids: &[&str]) {
    for (i, id) in ids.iter().enumerate() {
        write_image(&dir.join(format!("{id}.tif")), 7 + i as u32, W, H);
        std::fs::write(dir.join(format!("{id}.xml")), aperio_xml(&NUCLEI)).unwrap();
    }
}

#[test]
fn monuseg_training_and_test_layouts() {
    let root = tmpdir("monuseg");
    let train = root.join("MoNuSeg 2018 Training Data");
    let test = root.join("MoNuSegTestData");
    mkdirs(&train.join("Annotations"));
    build_monuseg_train(
        &train,
        &["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"],
    );
    build_monuseg_test(&test, &["TCGA-2Z-A9J9-01A-01-TS1"]);
    // the training folder itself
    let d = Dataset::open(&train, Format::Monuseg, Split::Train).unwrap();
    assert_eq!(
        ids(&d),
        ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"]
    );
    assert_eq!(
        d.samples[0].mask,
        MaskSource::AperioXml(train.join("Annotations/TCGA-18-5592-01Z-00-DX1.xml"))
    );
    let (img, mask) = d.load(1).unwrap();
    assert_eq!(img.data, expected_image(1, W, H));
    assert_eq!(mask, nuclei_mask());
    // the test folder itself
    let d = Dataset::open(&test, Format::Monuseg, Split::Test).unwrap();
    assert_eq!(ids(&d), ["TCGA-2Z-A9J9-01A-01-TS1"]);
    let (img, mask) = d.load(0).unwrap();
    assert_eq!(img.data, expected_image(7, W, H));
    assert_eq!(mask, nuclei_mask());
    // the parent: split picks the layout
    assert_eq!(
        Dataset::open(&root, Format::Monuseg, Split::Train)
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        ids(&Dataset::open(&root, Format::Monuseg, Split::Test).unwrap()),
        ["TCGA-2Z-A9J9-01A-01-TS1"]
    );
    assert_eq!(
        Dataset::open(&root, Format::Monuseg, Split::All)
            .unwrap()
            .len(),
        3
    );
    let e = err_text(Dataset::open(&root, Format::Monuseg, Split::Val));
    assert_has(&e, &["no validation split"]);
    // an image without its annotation
    std::fs::remove_file(train.join("Annotations/TCGA-21-5784-01Z-00-DX1.xml")).unwrap();
    let e = err_text(Dataset::open(&train, Format::Monuseg, Split::Train));
    assert_has(
        &e,
        &[
            "Tissue Images/TCGA-21-5784-01Z-00-DX1.tif",
            "without its mask",
            "Annotations/TCGA-21-5784-01Z-00-DX1.xml",
        ],
    );
    // a malformed annotation: error names the file and the line
    std::fs::write(
        test.join("TCGA-2Z-A9J9-01A-01-TS1.xml"),
        "<Annotations>\n<Regions>\n<Region Id=\"1\">\n<Vertex X=\"1\" Y=\"oops\"/>\n",
    )
    .unwrap();
    let d = Dataset::open(&test, Format::Monuseg, Split::Test).unwrap();
    let e = err_text(d.load(0));
    assert_has(&e, &["TCGA-2Z-A9J9-01A-01-TS1.xml", "line 4", "Y=\"oops\""]);
    let empty = tmpdir("monuseg-empty");
    let e = err_text(Dataset::open(&empty, Format::Monuseg, Split::Train));
    assert_has(
        &e,
        &[
            "no MoNuSeg-2018 train images",
            "Tissue Images/TCGA-18-5592-01Z-00-DX1.tif",
            "Annotations/TCGA-18-5592-01Z-00-DX1.xml",
        ],
    );
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn aperio_xml_reader() {
    let src = Path::new("/data/a.xml");
    let polys = parse_aperio_xml(&aperio_xml(&NUCLEI), src).unwrap();
    assert_eq!(polys.len(), 2);
    assert_eq!(
        polys[0],
        vec![[2.0, 1.0], [6.0, 1.0], [6.0, 4.0], [2.0, 4.0]]
    );
    assert_eq!(polys[1][2], [13.5, 11.5]);
    // single quotes, whitespace, separate closing tags, attribute order, fractional values
    let t = "<Annotations><Annotation><Regions><Region Id='1'><Vertices>\
             <Vertex  Y = '2.25'  X='426.446280' ></Vertex><Vertex X=\"1e1\" Y=\"3\"/>\
             </Vertices></Region><Region Id=\"2\"/></Regions></Annotation></Annotations>";
    let p = parse_aperio_xml(t, src).unwrap();
    assert_eq!(p, vec![vec![[426.44628, 2.25], [10.0, 3.0]]]);
    // an empty annotation set is valid
    assert_eq!(parse_aperio_xml("<Annotations/>", src).unwrap().len(), 0);
    // errors name the file (and the line)
    let cases = [
        (
            "<Regions><Region><Vertex X=\"1\" Y=\"2\"/></Region></Regions>",
            "no <Annotations>",
        ),
        (
            "<Annotations>\n<Region>\n<Vertex X=\"1\"/>\n</Region></Annotations>",
            "line 3: <Vertex> without a Y attribute",
        ),
        (
            "<Annotations>\n<Region>\n<Vertex X=\"nan\" Y=\"2\"/>",
            "line 3: <Vertex> X=\"nan\" is not a finite number",
        ),
        (
            "<Annotations>\n<Region Id=\"4\">\n<Vertex X=\"1\" Y=\"2\"/>\n</Annotations>",
            "line 2: <Region> never closed",
        ),
        (
            "<Annotations>\n</Region>",
            "line 2: </Region> without an open <Region>",
        ),
        ("<Annotations>\n<Region><Region>", "line 2: <Region> inside"),
        ("<Annotations>\n<Vertex X=\"1\"", "line 2: unterminated tag"),
        ("<Annotations><!-- never ends", "unterminated comment"),
    ];
    for (text, want) in cases {
        let e = parse_aperio_xml(text, src).unwrap_err().to_string();
        assert_has(&e, &["/data/a.xml", want]);
    }
}

// ---- rasteriser --------------------------------------------------------------------------------

fn art(rows: &[&str]) -> Vec<u8> {
    rows.iter()
        .flat_map(|r| r.bytes().map(|c| (c == b'#') as u8))
        .collect()
}

fn show(m: &[u8], w: usize) -> String {
    m.chunks(w)
        .map(|r| {
            r.iter()
                .map(|&v| if v != 0 { '#' } else { '.' })
                .collect::<String>()
                + "\n"
        })
        .collect()
}

fn assert_mask(got: &[u8], want: &[u8], w: usize) {
    assert_eq!(
        got,
        want,
        "\ngot:\n{}want:\n{}",
        show(got, w),
        show(want, w)
    );
}

#[test]
fn rasterise_triangle_with_vertices_on_pixel_centres() {
    // Right triangle (0.5,0.5), (6.5,0.5), (0.5,6.5): the hypotenuse x + y = 7 passes through the
    // centres of the pixels with x + y = 6, which lie on a right edge -> outside. The left edge
    // x = 0.5 holds the centres of column 0 -> inside; the top edge y = 0.5 row 0 -> inside.
    // Row y keeps x = 0 ..= 5 − y.
    let m = rasterize_polygons(&[vec![[0.5, 0.5], [6.5, 0.5], [0.5, 6.5]]], 8, 8);
    let want = art(&[
        "######..", "#####...", "####....", "###.....", "##......", "#.......", "........",
        "........",
    ]);
    assert_mask(&m, &want, 8);
    // the same triangle in the other orientation (vertex order reversed) gives the same pixels
    let m = rasterize_polygons(&[vec![[0.5, 6.5], [6.5, 0.5], [0.5, 0.5]]], 8, 8);
    assert_mask(&m, &want, 8);
}

#[test]
fn rasterise_general_triangle() {
    // Triangle A(1,1), B(9,3), C(3,7) in 10×8. Edges: AB y = 1 + (x−1)/4, i.e. x = 4y − 3;
    // BC x = 9 − 1.5(y − 3) = 13.5 − 1.5y; CA x = 1 + (y − 1)/3.
    // Row centres yc and spans [left, right) of the centre xc:
    //  yc 1.5: AB 3.0, CA 1.1667 -> xc in [1.17, 3.0) -> xc 1.5, 2.5 -> x 1, 2
    //  yc 2.5: AB 7.0, CA 1.5    -> xc in [1.5, 7)   -> x 1..=6
    //  yc 3.5: BC 8.25, CA 1.8333 -> xc in [1.83, 8.25) -> x 2..=7
    //  yc 4.5: BC 6.75, CA 2.1667 -> x 2..=6
    //  yc 5.5: BC 5.25, CA 2.5    -> xc in [2.5, 5.25) -> x 2..=4
    //  yc 6.5: BC 3.75, CA 2.8333 -> xc 3.5 -> x 3
    let m = rasterize_polygons(&[vec![[1.0, 1.0], [9.0, 3.0], [3.0, 7.0]]], 10, 8);
    let want = art(&[
        "..........",
        ".##.......",
        ".######...",
        "..######..",
        "..#####...",
        "..###.....",
        "...#......",
        "..........",
    ]);
    assert_mask(&m, &want, 10);
}

#[test]
fn rasterise_rectangles_concave_and_even_odd() {
    // integer corners (1,1)-(4,3): centres in [1,4)×[1,3) -> x 1..=3, y 1..=2;
    // half-integer corners (5.5,0.5)-(7.5,2.5): the centres on the left/top edges are inside
    let m = rasterize_polygons(
        &[
            vec![[1.0, 1.0], [4.0, 1.0], [4.0, 3.0], [1.0, 3.0]],
            vec![[5.5, 0.5], [7.5, 0.5], [7.5, 2.5], [5.5, 2.5]],
        ],
        9,
        4,
    );
    assert_mask(
        &m,
        &art(&[".....##..", ".###.##..", ".###.....", "........."]),
        9,
    );
    // a concave U: outer [1,7)×[1,6) minus the notch [3,5)×[3,6)
    let u = vec![
        [1.0, 1.0],
        [7.0, 1.0],
        [7.0, 6.0],
        [5.0, 6.0],
        [5.0, 3.0],
        [3.0, 3.0],
        [3.0, 6.0],
        [1.0, 6.0],
    ];
    let m = rasterize_polygons(&[u], 8, 7);
    assert_mask(
        &m,
        &art(&[
            "........", ".######.", ".######.", ".##..##.", ".##..##.", ".##..##.", "........",
        ]),
        8,
    );
    // even-odd: an outer square and an inner square traced in the same direction, joined by a
    // doubled bridge edge; the inner square is a hole (under non-zero winding it would be filled)
    let ring = vec![
        [0.0, 0.0],
        [8.0, 0.0],
        [8.0, 8.0],
        [0.0, 8.0],
        [0.0, 0.0],
        [2.0, 2.0],
        [6.0, 2.0],
        [6.0, 6.0],
        [2.0, 6.0],
        [2.0, 2.0],
    ];
    let m = rasterize_polygons(&[ring], 8, 8);
    let want = art(&[
        "########", "########", "##....##", "##....##", "##....##", "##....##", "########",
        "########",
    ]);
    assert_mask(&m, &want, 8);
    // overlapping polygons: union
    let a = vec![[0.0, 0.0], [3.0, 0.0], [3.0, 2.0], [0.0, 2.0]];
    let b = vec![[2.0, 1.0], [5.0, 1.0], [5.0, 3.0], [2.0, 3.0]];
    assert_mask(
        &rasterize_polygons(&[a, b], 6, 3),
        &art(&["###...", "#####.", "..###."]),
        6,
    );
    // degenerate polygons cover nothing
    let m = rasterize_polygons(
        &[
            vec![],
            vec![[1.0, 1.0]],
            vec![[0.0, 0.0], [5.0, 5.0]],
            vec![[0.0, 2.0], [5.0, 2.0], [3.0, 2.0]],
        ],
        6,
        6,
    );
    assert!(m.iter().all(|&v| v == 0));
}

#[test]
fn rasterise_clips_to_the_image() {
    // partly outside on the top-left and on the bottom-right, and one entirely outside
    let polys = [
        vec![[-3.0, -2.0], [4.0, -2.0], [4.0, 3.0], [-3.0, 3.0]],
        vec![[7.0, 5.0], [15.0, 5.0], [15.0, 20.0], [7.0, 20.0]],
        vec![[20.0, 20.0], [30.0, 20.0], [25.0, 30.0]],
        vec![[-9.0, 1.0], [-1.0, 1.0], [-5.0, 6.0]],
    ];
    let m = rasterize_polygons(&polys, 10, 8);
    let want = art(&[
        "####......",
        "####......",
        "####......",
        "..........",
        "..........",
        ".......###",
        ".......###",
        ".......###",
    ]);
    assert_mask(&m, &want, 10);
}

/// PNPoly point-in-polygon (even-odd, crossings strictly to the right), written independently.
fn pnpoly(poly: &[[f64; 2]], px: f64, py: f64) -> bool {
    let mut inside = false;
    let n = poly.len();
    let mut j = n - 1;
    for i in 0..n {
        let (xi, yi, xj, yj) = (poly[i][0], poly[i][1], poly[j][0], poly[j][1]);
        if (yi > py) != (yj > py) && px < (xj - xi) * (py - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[test]
fn rasterise_matches_point_in_polygon_on_random_polygons() {
    let mut rng = Rng::new(7);
    let (w, h) = (37, 29);
    for trial in 0..200 {
        let n = 3 + rng.below(9);
        // star-shaped around a centre (concave), some crossing the border; every 4th on the grid
        let (cx, cy) = (
            rng.range(-5.0, w as f64 + 5.0),
            rng.range(-5.0, h as f64 + 5.0),
        );
        let mut poly: Vec<[f64; 2]> = (0..n)
            .map(|i| {
                let a = std::f64::consts::TAU * (i as f64 + rng.range(0.0, 0.9)) / n as f64;
                let r = rng.range(2.0, 15.0);
                [cx + r * a.cos(), cy + r * a.sin()]
            })
            .collect();
        if trial % 4 == 0 {
            for v in poly.iter_mut() {
                v[0] = (v[0] * 2.0).round() / 2.0;
                v[1] = (v[1] * 2.0).round() / 2.0;
            }
        }
        if trial % 7 == 0 {
            rng.shuffle(&mut poly); // self-intersecting
        }
        let m = rasterize_polygons(&[poly.clone()], w, h);
        for y in 0..h {
            for x in 0..w {
                let want = pnpoly(&poly, x as f64 + 0.5, y as f64 + 0.5);
                assert_eq!(
                    m[y * w + x] != 0,
                    want,
                    "trial {trial}: pixel ({x},{y}) of {poly:?}"
                );
            }
        }
    }
}

// ---- generic and authors' folders ------------------------------------------------------------

fn build_generic(root: &Path) {
    write_image(&root.join("images/case1.png"), 1, W, H);
    write_image(&root.join("images/case2.jpg"), 2, W, H);
    write_image(&root.join("images/case10.bmp"), 3, W, H);
    write_image(&root.join("images/case3.tif"), 4, W, H);
    for (id, seed) in [("case1", 1), ("case2", 2), ("case10", 3), ("case3", 4)] {
        write_mask(&root.join(format!("masks/{id}.png")), seed, W, H);
    }
    std::fs::write(root.join("images/notes.txt"), "x").unwrap();
}

#[test]
fn generic_folder_with_and_without_split_json() {
    let root = tmpdir("generic");
    build_generic(&root);
    let all = Dataset::open(&root, Format::Generic, Split::All).unwrap();
    assert_eq!(ids(&all), ["case1", "case2", "case3", "case10"]);
    let (img, mask) = all.load(3).unwrap();
    assert_eq!(img.data, expected_image(3, W, H));
    assert_eq!(mask, expected_mask(3, W, H));
    // TIFF images load exactly too
    assert_eq!(all.load(2).unwrap().0.data, expected_image(4, W, H));
    // no split.json: only 'all'
    let e = err_text(Dataset::open(&root, Format::Generic, Split::Test));
    assert_has(&e, &["no split.json", "no test split", "split.json"]);
    // split.json with ids and file names (with or without folders)
    std::fs::write(
        root.join("split.json"),
        r#"{"train": ["case1", "case10.bmp"], "val": ["images/case3.tif"], "test": ["case2.jpg"]}"#,
    )
    .unwrap();
    assert_eq!(
        ids(&Dataset::open(&root, Format::Generic, Split::Train).unwrap()),
        ["case1", "case10"]
    );
    assert_eq!(
        ids(&Dataset::open(&root, Format::Generic, Split::Val).unwrap()),
        ["case3"]
    );
    assert_eq!(
        ids(&Dataset::open(&root, Format::Generic, Split::Test).unwrap()),
        ["case2"]
    );
    assert_eq!(
        Dataset::open(&root, Format::Generic, Split::All)
            .unwrap()
            .len(),
        4
    );
    // split.json naming an unknown image
    std::fs::write(
        root.join("split.json"),
        r#"{"train": ["case1"], "test": ["case7.png"]}"#,
    )
    .unwrap();
    let e = err_text(Dataset::open(&root, Format::Generic, Split::Test));
    assert_has(
        &e,
        &["split.json", "\"case7.png\"", "no image with id \"case7\""],
    );
    // a missing split key
    let e = err_text(Dataset::open(&root, Format::Generic, Split::Val));
    assert_has(&e, &["split.json", "no \"val\" list", "\"train\""]);
    // invalid JSON
    std::fs::write(root.join("split.json"), "{\"train\": [").unwrap();
    let e = err_text(Dataset::open(&root, Format::Generic, Split::Train));
    assert_has(&e, &["split.json", "not valid JSON"]);
    std::fs::remove_file(root.join("split.json")).unwrap();
    // an image without its mask
    std::fs::remove_file(root.join("masks/case3.png")).unwrap();
    let e = err_text(Dataset::open(&root, Format::Generic, Split::All));
    assert_has(
        &e,
        &["images/case3.tif", "without its mask", "masks/case3.png"],
    );
    // a mask in another image format is accepted when no .png exists
    write_mask(&root.join("masks/case3.bmp"), 4, W, H);
    let d = Dataset::open(&root, Format::Generic, Split::All).unwrap();
    assert_eq!(
        d.samples[2].mask,
        MaskSource::Png(root.join("masks/case3.bmp"))
    );
    assert_eq!(d.load(2).unwrap().1, expected_mask(4, W, H));
    // two images with the same id
    write_image(&root.join("images/case1.jpg"), 1, W, H);
    let e = err_text(Dataset::open(&root, Format::Generic, Split::All));
    assert_has(&e, &["same id \"case1\"", "case1.jpg", "case1.png"]);
    let empty = tmpdir("generic-empty");
    let e = err_text(Dataset::open(&empty, Format::Generic, Split::All));
    assert_has(
        &e,
        &[
            "no images/ folder",
            "images/case001.png",
            "masks/case001.png",
        ],
    );
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn authors_layout_with_data_split() {
    let root = tmpdir("authors");
    let names = [
        "ISIC_0000000",
        "ISIC_0000001",
        "ISIC_0000002",
        "ISIC_0000003",
    ];
    for (i, id) in names.iter().enumerate() {
        write_image(&root.join(format!("image_1024/{id}.png")), i as u32, W, H);
        write_mask(&root.join(format!("mask_1024/{id}.png")), i as u32, W, H);
    }
    // all works without data_split.json; a split needs it
    assert_eq!(
        Dataset::open(&root, Format::Authors, Split::All)
            .unwrap()
            .len(),
        4
    );
    let e = err_text(Dataset::open(&root, Format::Authors, Split::Test));
    assert_has(&e, &["data_split.json not found", "test split"]);
    std::fs::write(
        root.join("data_split.json"),
        r#"{"train": ["ISIC_0000000.png", "ISIC_0000003.png", "ISIC_0000001.png"], "test": ["ISIC_0000002.png"]}"#,
    )
    .unwrap();
    let tr = Dataset::open(&root, Format::Authors, Split::Train).unwrap();
    assert_eq!(ids(&tr), ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"]);
    assert_eq!(
        tr.samples[2].image,
        root.join("image_1024/ISIC_0000003.png")
    );
    let te = Dataset::open(&root, Format::Authors, Split::Test).unwrap();
    assert_eq!(ids(&te), ["ISIC_0000002"]);
    let (img, mask) = te.load(0).unwrap();
    assert_eq!(img.data, expected_image(2, W, H));
    assert_eq!(mask, expected_mask(2, W, H));
    let e = err_text(Dataset::open(&root, Format::Authors, Split::Val));
    assert_has(&e, &["data_split.json", "no \"val\" list"]);
    std::fs::remove_dir_all(&root).unwrap();
}

// ---- generic errors, parsing, binarisation ---------------------------------------------------

#[test]
fn missing_root_and_file_root() {
    let root = std::env::temp_dir().join(format!("medfastsam-ds-nowhere-{}", std::process::id()));
    for f in [
        Format::Isic2018,
        Format::Ph2,
        Format::Monuseg,
        Format::Tnbc,
        Format::Generic,
        Format::Authors,
    ] {
        let e = err_text(Dataset::open(&root, f, Split::All));
        assert_has(&e, &[root.to_str().unwrap(), "dataset folder not found"]);
    }
    let dir = tmpdir("fileroot");
    let file = dir.join("a.png");
    write_image(&file, 0, 4, 4);
    let e = err_text(Dataset::open(&file, Format::Generic, Split::All));
    assert_has(&e, &["a.png", "not a folder"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn format_and_split_names() {
    for f in [
        Format::Isic2018,
        Format::Ph2,
        Format::Monuseg,
        Format::Tnbc,
        Format::Generic,
        Format::Authors,
    ] {
        assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
    }
    assert_eq!("ISIC2018".parse::<Format>().unwrap(), Format::Isic2018);
    let e = "kvasir".parse::<Format>().unwrap_err().to_string();
    assert_has(
        &e,
        &["\"kvasir\"", "isic2018|ph2|monuseg|tnbc|generic|authors"],
    );
    for s in [Split::Train, Split::Val, Split::Test, Split::All] {
        assert_eq!(s.to_string().parse::<Split>().unwrap(), s);
    }
    assert_eq!("validation".parse::<Split>().unwrap(), Split::Val);
    let e = "dev".parse::<Split>().unwrap_err().to_string();
    assert_has(&e, &["\"dev\"", "train|val|test|all"]);
}

#[test]
fn mask_binarisation_rules() {
    let dir = tmpdir("binarize");
    let load = |name: &str| medfastsam::io::load_gray(&dir.join(name)).unwrap();
    // 8-bit 0/255 with grey levels: > 127
    image::GrayImage::from_raw(4, 1, vec![0, 127, 128, 255])
        .unwrap()
        .save(dir.join("a.png"))
        .unwrap();
    assert_eq!(binarize(&load("a.png")), vec![0, 0, 1, 1]);
    // 16-bit label image: label > 0
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_raw(4, 1, vec![0, 1, 2, 300])
        .unwrap()
        .save(dir.join("b.png"))
        .unwrap();
    assert_eq!(binarize(&load("b.png")), vec![0, 1, 1, 1]);
    // 8-bit 0/1 mask (max 1): > 0, and an 8-bit label image with labels below 128
    image::GrayImage::from_raw(4, 1, vec![0, 1, 0, 1])
        .unwrap()
        .save(dir.join("c.png"))
        .unwrap();
    assert_eq!(binarize(&load("c.png")), vec![0, 1, 0, 1]);
    image::GrayImage::from_raw(4, 1, vec![0, 3, 17, 0])
        .unwrap()
        .save(dir.join("d.png"))
        .unwrap();
    assert_eq!(binarize(&load("d.png")), vec![0, 1, 1, 0]);
    // RGB mask: first channel
    image::RgbImage::from_raw(2, 1, vec![255, 0, 0, 0, 255, 255])
        .unwrap()
        .save(dir.join("e.png"))
        .unwrap();
    assert_eq!(binarize(&load("e.png")), vec![1, 0]);
    // empty mask stays empty
    image::GrayImage::from_raw(3, 1, vec![0, 0, 0])
        .unwrap()
        .save(dir.join("f.png"))
        .unwrap();
    assert_eq!(binarize(&load("f.png")), vec![0, 0, 0]);
    std::fs::remove_dir_all(&dir).unwrap();
}
